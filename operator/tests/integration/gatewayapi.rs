//! Tandem's own Gateway API implementation serving the HTTPRoute the
//! operator generates for `spec.gateway`, end to end on the local control
//! plane: the gateway (under the chart's RBAC) accepts its GatewayClass and
//! Gateway, binds the Gateway's address, reports the route Accepted (which
//! turns the app Ready), wakes a Function at zero for a request through the
//! Gateway, and splits a weighted route as the HybridApp says, measured at
//! the client.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use tandem::api::HybridApp;
use tandem::controller::httproute::HttpRoute;
use testenv::{TestNamespace, environment, wait_for};

use crate::gateway::GatewayHandle;
use crate::support::{OperatorProcess, install_crd, install_gateway_api, operator_kubeconfig};

/// The address pool of this test's gateway (loopback: the test reaches it).
const ADDRESSES: &str = "127.0.12.0/29";
/// The first address of the pool: the Gateway's.
const GATEWAY_ADDRESS: &str = "127.0.12.1";

fn gateway_api(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        kind,
    ))
}

/// The services tests' app, with `spec.gateway` naming listener `http` of
/// Gateway `edge` and a route `/search` split 80/20 between its workloads.
fn app() -> HybridApp {
    let mut app = crate::services::app();
    app.spec.gateway = Some(
        serde_json::from_value(json!({"parentRefs": [{"name": "edge", "sectionName": "http"}]}))
            .unwrap(),
    );
    app.spec.routes.push(
        serde_json::from_value(json!({"name": "search", "match": {"pathPrefix": "/search"},
            "backends": [{"workload": "store", "weight": 80}, {"workload": "thumbs", "weight": 20}]}))
        .unwrap(),
    );
    app
}

/// `GET path` through the Gateway with Host `shop.example.com`: status and
/// the workload that answered (from the echo pod's name).
async fn through_gateway(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    path: &str,
) -> Result<(u16, String), String> {
    let request = http::Request::get(format!("http://{GATEWAY_ADDRESS}{path}"))
        .header("host", "shop.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        // "pod=shop-store-<hash> ...": the workload is the name's second part.
        let workload = body
            .strip_prefix("pod=shop-")
            .and_then(|rest| rest.split('-').next())
            .unwrap_or(&body)
            .to_string();
        Ok::<_, String>((status, workload))
    };
    tokio::time::timeout(Duration::from_secs(90), exchange)
        .await
        .map_err(|_| format!("{path}: no answer within 90s"))?
}

#[tokio::test]
async fn the_generated_httproute_is_served_by_tandems_gateway_api_implementation() {
    install_crd().await;
    install_gateway_api().await;
    let ns = TestNamespace::create("gwapi").await;
    let client = environment().client().await;
    let controller = format!("tandem.dev/gateway-{}", ns.name);
    let class_name = format!("tandem-{}", ns.name);
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &gateway_api("GatewayClass"));
    let mut class = DynamicObject::new(&class_name, &gateway_api("GatewayClass"));
    class.data = json!({"spec": {"controllerName": controller}});
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &gateway_api("Gateway"));
    let mut edge = DynamicObject::new("edge", &gateway_api("Gateway")).within(&ns.name);
    edge.data = json!({"spec": {"gatewayClassName": class_name,
        "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}});
    gateways
        .create(&PostParams::default(), &edge)
        .await
        .unwrap();

    let kubeconfig = operator_kubeconfig(&ns.name).await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let node_ip = environment().control_plane.network.node_ip().to_string();
    let gateway = GatewayHandle::for_operator_as(
        "gwapi",
        &ns.name,
        &operator,
        &["gateway-rbac.yaml", "gateway-api-rbac.yaml"],
        &[
            format!("--advertise-address={node_ip}"),
            format!("--gateway-controller-name={controller}"),
            format!("--gateway-addresses={ADDRESSES}"),
            format!("--gateway-status-lease={}/tandem-gateway-status", ns.name),
        ],
    )
    .await;

    // The Gateway is programmed at the first address of the pool.
    wait_for(
        "the Gateway to be programmed",
        Duration::from_secs(60),
        || async {
            let edge = gateways.get("edge").await.map_err(|e| e.to_string())?;
            let status = &edge.data["status"];
            let programmed = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True");
            if programmed && status["addresses"][0]["value"] == GATEWAY_ADDRESS {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;

    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app()).await.unwrap();
    // The operator's HTTPRoute, accepted by Tandem's implementation, and so
    // the app Ready.
    let routes: Api<HttpRoute> = ns.api();
    wait_for(
        "the HTTPRoute accepted by Tandem's gateway",
        Duration::from_secs(90),
        || async {
            let route = routes.get("shop").await.map_err(|e| e.to_string())?;
            let parents = route.status.as_ref().map(|s| s["parents"].clone());
            let accepted = parents
                .iter()
                .flat_map(|p| p.as_array())
                .flatten()
                .any(|p| {
                    p["controllerName"] == controller.as_str()
                        && p["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Accepted" && c["status"] == "True")
                });
            if accepted {
                Ok(())
            } else {
                Err(format!("{parents:?}"))
            }
        },
    )
    .await;
    wait_for("the app to be Ready", Duration::from_secs(90), || async {
        let app = apps.get("shop").await.map_err(|e| e.to_string())?;
        let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        {
            Ok(())
        } else {
            Err(format!("{conditions:?}"))
        }
    })
    .await;

    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // The always-on workload, straight through the Gateway.
    let checkout = wait_for(
        "/checkout through the Gateway",
        Duration::from_secs(60),
        || {
            let http = http.clone();
            async move {
                match through_gateway(&http, "/checkout").await? {
                    (200, workload) => Ok(workload),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(checkout, "store");
    // It went to the store's own selector Service: the gateway did not
    // count it as a request of the HybridApp's workload.
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("tandem_gateway_requests_total{")
                && l.contains("app=\"shop\"")
                && l.contains("workload=\"store\"")),
        "the gateway counted /checkout as a request of workload store:\n{metrics}"
    );
    // The Function at zero, woken by one request through the Gateway that is
    // held, not refused.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = ns.api();
    let thumbs = deployments.get("shop-thumbs").await.unwrap();
    assert_eq!(
        thumbs.spec.and_then(|s| s.replicas),
        Some(0),
        "the Function starts at zero"
    );
    assert_eq!(
        through_gateway(&http, "/thumbnail").await.unwrap(),
        (200, "thumbs".to_string()),
        "a cold start through the Gateway is answered by the Function"
    );

    // 80/20, measured at the client over 5,000 requests (4 connections).
    const REQUESTS: usize = 5_000;
    let counts: BTreeMap<String, usize> = futures::future::join_all((0..4).map(|_| {
        let http = http.clone();
        async move {
            let mut counts = BTreeMap::new();
            for _ in 0..REQUESTS / 4 {
                let (status, workload) = through_gateway(&http, "/search").await.unwrap();
                assert_eq!(status, 200, "{workload}");
                *counts.entry(workload).or_insert(0) += 1;
            }
            counts
        }
    }))
    .await
    .into_iter()
    .fold(BTreeMap::new(), |mut all, counts| {
        for (workload, n) in counts {
            *all.entry(workload).or_insert(0) += n;
        }
        all
    });
    let share = |w: &str| 100.0 * counts.get(w).copied().unwrap_or(0) as f64 / REQUESTS as f64;
    eprintln!(
        "split through the Gateway over {REQUESTS} requests: store {:.2}%, thumbs {:.2}%",
        share("store"),
        share("thumbs")
    );
    assert!((share("store") - 80.0).abs() <= 2.0, "{counts:?}");
    assert!((share("thumbs") - 20.0).abs() <= 2.0, "{counts:?}");

    // A weight change shows up in the route and in the measured split.
    crate::services::set_weights(&apps, 2, [50, 50]).await;
    wait_for("the 50/50 split", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            let mut thumbs = 0;
            for _ in 0..200 {
                if through_gateway(&http, "/search").await?.1 == "thumbs" {
                    thumbs += 1;
                }
            }
            if (90..=110).contains(&thumbs) {
                Ok(())
            } else {
                Err(format!("{thumbs} of 200 to thumbs"))
            }
        }
    })
    .await;

    // HTTPS: a second Gateway whose listeners take certificates from
    // Secrets, chosen by SNI; rotating a Secret serves new connections with
    // the new certificate while an open connection goes on.
    https_with_rotation(&ns.name, &class_name, &controller).await;

    operator.assert_never_forbidden();
    let log = gateway.log_text();
    assert!(
        !log.contains("is forbidden"),
        "the gateway was refused something:\n{log}"
    );
}

/// A `kubernetes.io/tls` Secret with a new self-signed certificate for
/// `names`; the certificate's DER.
fn tls_secret(
    namespace: &str,
    name: &str,
    names: &[&str],
) -> (k8s_openapi::api::core::v1::Secret, Vec<u8>) {
    let certified =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let mut secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls"
    }))
    .unwrap();
    secret.data = Some(
        [
            ("tls.crt", certified.cert.pem()),
            ("tls.key", certified.signing_key.serialize_pem()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.into_bytes())))
        .collect(),
    );
    (secret, certified.cert.der().to_vec())
}

type TlsClient = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `at` asking for `name`, trusting `trusted`; and
/// the certificate the server showed.
async fn tls_connect(
    at: std::net::SocketAddr,
    name: &'static str,
    trusted: &[&Vec<u8>],
) -> Result<(TlsClient, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(at)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from(name).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((tls, shown))
}

/// `GET /checkout` on an open TLS connection: the status line.
async fn tls_get(tls: &mut TlsClient, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /checkout HTTP/1.1\r\nhost: {host}\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        // The echo answer's head ends its length-delimited body: read until
        // the head is in and its body has arrived.
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return head.lines().next().unwrap_or_default().to_string();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an answer within 30s")
}

async fn https_with_rotation(namespace: &str, class_name: &str, controller: &str) {
    let client = environment().client().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let (secret_a, der_a) = tls_secret(namespace, "cert-a", &["a.example"]);
    let (secret_b, der_b) = tls_secret(namespace, "cert-b", &["*.b.example"]);
    for secret in [&secret_a, &secret_b] {
        secrets
            .create(&PostParams::default(), secret)
            .await
            .unwrap();
    }
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &gateway_api("Gateway"));
    let mut secure = DynamicObject::new("secure", &gateway_api("Gateway")).within(namespace);
    secure.data = json!({"spec": {"gatewayClassName": class_name, "listeners": [
        {"name": "a", "port": 443, "protocol": "HTTPS", "hostname": "a.example",
         "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert-a"}]}},
        {"name": "b", "port": 443, "protocol": "HTTPS", "hostname": "*.b.example",
         "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert-b"}]}}]}});
    gateways
        .create(&PostParams::default(), &secure)
        .await
        .unwrap();
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &gateway_api("HTTPRoute"));
    let mut route = DynamicObject::new("secure", &gateway_api("HTTPRoute")).within(namespace);
    route.data = json!({"spec": {"parentRefs": [{"name": "secure"}],
        "rules": [{"backendRefs": [{"name": "shop-store", "port": 80}]}]}});
    routes.create(&PostParams::default(), &route).await.unwrap();
    let address: std::net::IpAddr = wait_for(
        "the HTTPS Gateway programmed and its route accepted",
        Duration::from_secs(60),
        || async {
            let gateway = gateways.get("secure").await.map_err(|e| e.to_string())?;
            let route = routes.get("secure").await.map_err(|e| e.to_string())?;
            let true_in = |conditions: &serde_json::Value, kind: &str| {
                conditions
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == kind && c["status"] == "True")
            };
            let accepted = route.data["status"]["parents"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| {
                    p["controllerName"] == controller && true_in(&p["conditions"], "Accepted")
                });
            let status = &gateway.data["status"];
            match status["addresses"][0]["value"].as_str() {
                Some(address) if accepted && true_in(&status["conditions"], "Programmed") => {
                    address.parse().map_err(|e| format!("{address}: {e}"))
                }
                _ => Err(format!("{status} / {}", route.data["status"])),
            }
        },
    )
    .await;
    let at = std::net::SocketAddr::new(address, 443);
    let both = [&der_a, &der_b];
    let (mut on_a, shown) = wait_for(
        "a TLS connection to a.example",
        Duration::from_secs(30),
        || tls_connect(at, "a.example", &both),
    )
    .await;
    assert_eq!(shown, der_a, "listener a's certificate for a.example");
    assert!(
        tls_get(&mut on_a, "a.example")
            .await
            .starts_with("http/1.1 200")
    );
    let (mut on_b, shown) = tls_connect(at, "x.b.example", &[&der_a, &der_b])
        .await
        .unwrap();
    assert_eq!(shown, der_b, "listener b's certificate for x.b.example");
    assert!(
        tls_get(&mut on_b, "x.b.example")
            .await
            .starts_with("http/1.1 200")
    );

    // Rotated in the API server.
    let (rotated, der_rotated) = tls_secret(namespace, "cert-a", &["a.example"]);
    let mut current = secrets.get("cert-a").await.unwrap();
    current.data = rotated.data;
    secrets
        .replace("cert-a", &PostParams::default(), &current)
        .await
        .unwrap();
    let trusted = [&der_a, &der_b, &der_rotated];
    let (mut fresh, _) = wait_for(
        "a new connection to get the rotated certificate",
        Duration::from_secs(30),
        || async {
            let (tls, shown) = tls_connect(at, "a.example", &trusted).await?;
            if shown == der_rotated {
                Ok((tls, shown))
            } else {
                Err("still the old certificate".to_string())
            }
        },
    )
    .await;
    assert!(
        tls_get(&mut fresh, "a.example")
            .await
            .starts_with("http/1.1 200")
    );
    assert!(
        tls_get(&mut on_a, "a.example")
            .await
            .starts_with("http/1.1 200"),
        "the connection made before the rotation goes on"
    );
}
