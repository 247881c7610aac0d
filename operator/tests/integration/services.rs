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
use crate::support::{OperatorProcess, install_crd, install_gateway_api, operator_kubeconfig};
use tandem::controller::httproute::HttpRoute;

/// App `shop` (host shop.example.com): `store` AlwaysOn scaled on CPU at
/// `/checkout`, `thumbs` a Function at `/thumbnail`.
pub fn app() -> HybridApp {
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

/// Waits until the app's `Ready` is true for its current generation and
/// returns that generation.
async fn ready_for_current_generation(apps: &Api<HybridApp>, name: &str) -> i64 {
    wait_for(
        "Ready for the current generation",
        Duration::from_secs(60),
        || async {
            let app = apps.get(name).await.map_err(|e| e.to_string())?;
            let generation = app.metadata.generation.unwrap_or_default();
            let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
            let ready = conditions.iter().find(|c| c.type_ == "Ready");
            match ready {
                Some(c) if c.status == "True" && c.observed_generation == Some(generation) => {
                    Ok(generation)
                }
                other => Err(format!("generation {generation}, Ready {other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn ready_means_every_gateway_serves_the_current_generation() {
    install_crd().await;
    let ns = TestNamespace::create("routable").await;
    let kubeconfig = operator_kubeconfig(&ns.name).await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let gateway = GatewayHandle::for_operator("routable", &ns.name, &operator).await;
    let apps: Api<HybridApp> = ns.api();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let get = |host: String, path: &str| {
        let request = http::Request::get(gateway.url(path))
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let client = client.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), client.request(request))
                .await
                .expect("an answer within 60 s")
                .expect("a response")
                .status()
                .as_u16()
        }
    };
    for i in 0..3 {
        // A new app (a Function at zero is Ready at once): the first request
        // after Ready is routed, never 404.
        let name = format!("app{i}");
        let host = format!("{name}.example.com");
        let app: HybridApp = serde_json::from_value(json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
            "metadata": {"name": name},
            "spec": {
                "hosts": [host],
                "workloads": [{"name": "fn", "mode": "Function", "port": 8080, "requestTimeout": "60s",
                               "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "fn", "image": "example/fn:1"}]}}}],
                "routes": [{"name": "a", "match": {"pathPrefix": "/a"}, "backends": [{"workload": "fn"}]}]
            }
        }))
        .unwrap();
        apps.create(&PostParams::default(), &app).await.unwrap();
        ready_for_current_generation(&apps, &name).await;
        assert_eq!(
            get(host.clone(), "/a").await,
            200,
            "{name}: the first request"
        );

        // A new route: Ready again only once the gateway serves it.
        let patch = json!({"spec": {"routes": [
            {"name": "a", "match": {"pathPrefix": "/a"}, "backends": [{"workload": "fn"}]},
            {"name": "b", "match": {"pathPrefix": "/b"}, "backends": [{"workload": "fn"}]}
        ]}});
        apps.patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
        let generation = ready_for_current_generation(&apps, &name).await;
        assert_eq!(get(host.clone(), "/b").await, 200, "{name}: the new route");
        let status = apps.get(&name).await.unwrap().status.unwrap();
        let programmed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "RoutesProgrammed")
            .expect("RoutesProgrammed");
        assert_eq!(programmed.status, "True");
        assert_eq!(
            programmed.message,
            format!("all 1 gateway(s) serve generation {generation}")
        );
    }
    operator.assert_never_forbidden();
}

/// Sets the weights of the two backends of route `route` of app `shop`.
pub async fn set_weights(apps: &Api<HybridApp>, route: usize, weights: [i32; 2]) {
    let mut spec_routes = apps.get("shop").await.unwrap().spec.routes;
    for (backend, weight) in spec_routes[route].backends.iter_mut().zip(weights) {
        backend.weight = Some(weight);
    }
    apps.patch(
        "shop",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"spec": {"routes": spec_routes}})),
    )
    .await
    .unwrap();
}

/// The backends of rule `rule` of the HTTPRoute: (Service, weight).
fn backends(route: &HttpRoute, rule: &str) -> Vec<(String, i64)> {
    route.spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == rule)
        .flat_map(|r| r["backendRefs"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["weight"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn spec_gateway_owns_one_httproute_that_follows_the_app() {
    install_crd().await;
    install_gateway_api().await;
    let ns = TestNamespace::create("httproute").await;
    let kubeconfig = operator_kubeconfig(&ns.name).await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let apps: Api<HybridApp> = ns.api();
    let routes: Api<HttpRoute> = ns.api();
    let mut app = app();
    app.spec.gateway = Some(
        serde_json::from_value(
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "http"}]}),
        )
        .unwrap(),
    );
    app.spec.routes.push(
        serde_json::from_value(json!({"name": "search", "match": {"pathPrefix": "/search", "methods": ["GET", "HEAD"]},
            "backends": [{"workload": "store", "weight": 80}, {"workload": "thumbs", "weight": 20}]}))
        .unwrap(),
    );
    apps.create(&PostParams::default(), &app).await.unwrap();

    // Accepted by the real CRD's schema and CEL: it exists, as built.
    let split = |route: &HttpRoute| backends(route, "search");
    let route = wait_for("the HTTPRoute", Duration::from_secs(60), || async {
        routes.get("shop").await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(
        split(&route),
        [
            ("shop-store".to_string(), 80),
            ("shop-thumbs".to_string(), 20)
        ]
    );
    assert_eq!(
        backends(&route, "checkout"),
        [("shop-store".to_string(), 1)]
    );
    assert_eq!(route.spec["hostnames"], json!(["shop.example.com"]));
    assert_eq!(route.spec["parentRefs"][0]["name"], "edge");
    assert_eq!(
        route.spec["rules"][2]["matches"].as_array().unwrap().len(),
        2,
        "one match per method"
    );

    // Not Ready until the Gateway accepts the route.
    let condition = |app: &HybridApp, kind: &str| {
        app.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind).cloned())
    };
    let waiting = wait_for(
        "RoutesProgrammed to wait for the Gateway",
        Duration::from_secs(60),
        || async {
            let app = apps.get("shop").await.map_err(|e| e.to_string())?;
            match condition(&app, "RoutesProgrammed") {
                Some(c) if c.reason == "HTTPRouteNotAccepted" => Ok(app),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(condition(&waiting, "Ready").unwrap().status, "False");
    // The Gateway's implementation accepts it (as Tandem's own will, or
    // any other's would).
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let generation = route.metadata.generation.unwrap();
    let verdict = |kind: &str| {
        json!({"type": kind, "status": "True", "reason": kind, "message": "",
        "observedGeneration": generation, "lastTransitionTime": now})
    };
    let status = json!({"status": {"parents": [{
        "parentRef": {"name": "edge", "namespace": "infra", "sectionName": "http"},
        "controllerName": "example.com/gateway",
        "conditions": [verdict("Accepted"), verdict("ResolvedRefs")]}]}});
    routes
        .patch_status(
            "shop",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await
        .unwrap();
    wait_for(
        "Ready once the Gateway accepted the route",
        Duration::from_secs(90),
        || async {
            let app = apps.get("shop").await.map_err(|e| e.to_string())?;
            let (ready, programmed) = (
                condition(&app, "Ready"),
                condition(&app, "RoutesProgrammed"),
            );
            match (&ready, &programmed) {
                (Some(r), Some(p)) if r.status == "True" && p.status == "True" => Ok(()),
                _ => Err(format!("Ready {ready:?}, RoutesProgrammed {programmed:?}")),
            }
        },
    )
    .await;

    // Edited by hand: put back.
    let edit = json!({"spec": {"rules": [{"name": "search", "backendRefs": [{"name": "shop-store", "port": 80, "weight": 1}]}]}});
    routes
        .patch(
            "shop",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&edit),
        )
        .await
        .unwrap();
    wait_for(
        "the edited HTTPRoute to be put back",
        Duration::from_secs(30),
        || async {
            let route = routes.get("shop").await.map_err(|e| e.to_string())?;
            let rules = route.spec["rules"].as_array().map_or(0, Vec::len);
            match (rules, split(&route)) {
                (3, weights) if weights.len() == 2 && weights[0].1 == 80 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // A weight change in the app shows up in the route.
    set_weights(&apps, 2, [60, 40]).await;
    wait_for(
        "the new weights in the HTTPRoute",
        Duration::from_secs(30),
        || async {
            let route = routes.get("shop").await.map_err(|e| e.to_string())?;
            match split(&route).as_slice() {
                [(_, 60), (_, 40)] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // spec.gateway removed: the route goes.
    apps.patch(
        "shop",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"spec": {"gateway": null}})),
    )
    .await
    .unwrap();
    wait_for(
        "the HTTPRoute to be deleted",
        Duration::from_secs(30),
        || async {
            match routes.get_opt("shop").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
    operator.assert_never_forbidden();
}
