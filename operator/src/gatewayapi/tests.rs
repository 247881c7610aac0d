use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use serde_json::{Value, json};

use super::attach::{Backend, Condition, Outcome};
use super::model::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};

fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("test object")
}

struct Cluster {
    classes: Vec<GatewayClass>,
    gateways: Vec<Gateway>,
    routes: Vec<HttpRoute>,
    grants: Vec<ReferenceGrant>,
    services: Vec<Service>,
    secrets: Vec<Secret>,
    namespaces: Vec<Namespace>,
    addresses: Vec<IpAddr>,
}

impl Cluster {
    fn new() -> Self {
        Self {
            classes: vec![
                from(
                    json!({"metadata": {"name": "tandem", "generation": 2}, "spec": {"controllerName": "tandem.dev/gateway"}}),
                ),
                from(
                    json!({"metadata": {"name": "other", "generation": 1}, "spec": {"controllerName": "example.com/other"}}),
                ),
            ],
            gateways: Vec::new(),
            routes: Vec::new(),
            grants: Vec::new(),
            services: vec![
                from(
                    json!({"metadata": {"name": "web", "namespace": "apps"}, "spec": {"ports": [{"port": 8080}]}}),
                ),
                from(
                    json!({"metadata": {"name": "db", "namespace": "data"}, "spec": {"ports": [{"port": 5432}]}}),
                ),
            ],
            secrets: Vec::new(),
            namespaces: vec![
                from(json!({"metadata": {"name": "apps", "labels": {"team": "a"}}})),
                from(json!({"metadata": {"name": "infra"}})),
                from(json!({"metadata": {"name": "data"}})),
            ],
            addresses: vec!["127.0.10.1".parse().unwrap(), "127.0.10.2".parse().unwrap()],
        }
    }

    fn gateway(mut self, name: &str, listeners: Value) -> Self {
        self.gateways.push(from(json!({
            "metadata": {"name": name, "namespace": "infra", "generation": 3},
            "spec": {"gatewayClassName": "tandem", "listeners": listeners}
        })));
        self
    }

    /// Gateway `infra/edge` with one HTTP listener on port 80 for routes of
    /// every namespace.
    fn http_edge(self) -> Self {
        self.gateway(
            "edge",
            json!([{"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}]),
        )
    }

    fn route(mut self, namespace: &str, name: &str, spec: Value) -> Self {
        self.routes.push(from(json!({
            "metadata": {"name": name, "namespace": namespace, "generation": 5},
            "spec": spec
        })));
        self
    }

    fn compute(&self) -> Outcome {
        let objects = super::serve::Objects {
            classes: self.classes.clone(),
            gateways: self.gateways.clone(),
            routes: self.routes.clone(),
            grants: self.grants.clone(),
            services: self.services.clone(),
            secrets: self.secrets.clone(),
            namespaces: self.namespaces.clone(),
            slices: Vec::new(),
        };
        objects.serve("tandem.dev/gateway", &self.addresses).0
    }
}

fn find<'a>(conditions: &'a [Condition], kind: &str) -> &'a Condition {
    conditions
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {conditions:?}"))
}

fn verdict(conditions: &[Condition], kind: &str) -> (bool, &'static str) {
    let c = find(conditions, kind);
    (c.status, c.reason)
}

fn route_verdict(outcome: &Outcome, name: &str, kind: &str) -> Vec<(bool, &'static str)> {
    outcome
        .route_status
        .iter()
        .find(|(k, _)| k.1 == name)
        .map(|(_, parents)| {
            parents
                .iter()
                .map(|p| verdict(&p.conditions, kind))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn only_classes_with_tandems_controller_name_are_accepted() {
    let outcome = Cluster::new().compute();
    assert_eq!(outcome.classes.len(), 1);
    let (name, conditions) = &outcome.classes[0];
    assert_eq!(name, "tandem");
    assert_eq!(verdict(conditions, "Accepted"), (true, "Accepted"));
    assert_eq!(find(conditions, "Accepted").observed_generation, 2);
}

#[test]
fn a_gateway_is_accepted_when_at_least_one_listener_is_valid() {
    let outcome = Cluster::new()
        .gateway(
            "mixed",
            json!([{"name": "http", "port": 80, "protocol": "HTTP"}, {"name": "bad", "port": 1111, "protocol": "INVALID"}]),
        )
        .gateway(
            "none",
            json!([{"name": "bad", "port": 1111, "protocol": "INVALID"}]),
        )
        .compute();
    let status = |name: &str| {
        outcome
            .gateway_status
            .iter()
            .find(|g| g.key.1 == name)
            .unwrap()
    };
    let mixed = status("mixed");
    assert_eq!(
        verdict(&mixed.conditions, "Accepted"),
        (true, "ListenersNotValid")
    );
    assert_eq!(
        verdict(&mixed.conditions, "Programmed"),
        (true, "Programmed")
    );
    assert_eq!(mixed.listeners[0].supported_kinds, vec!["HTTPRoute"]);
    assert!(mixed.listeners[1].supported_kinds.is_empty());
    assert_eq!(
        verdict(&mixed.listeners[1].conditions, "Accepted"),
        (false, "UnsupportedProtocol")
    );
    assert_eq!(
        verdict(&status("none").conditions, "Accepted"),
        (false, "ListenersNotValid")
    );
    assert_eq!(find(&mixed.conditions, "Accepted").observed_generation, 3);
    // Each Gateway has an address of its own; only the valid listener is served.
    assert_ne!(mixed.address, status("none").address);
    let served = outcome
        .gateways
        .iter()
        .find(|g| g.key.1 == "mixed")
        .unwrap();
    assert_eq!(served.listeners.len(), 1);
}

#[test]
fn routes_attach_where_namespaces_section_names_and_hostnames_allow() {
    let outcome = Cluster::new()
        .gateway(
            "edge",
            json!([
                {"name": "same", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
                {"name": "all", "port": 80, "protocol": "HTTP", "hostname": "all.test", "allowedRoutes": {"namespaces": {"from": "All"}}},
                {"name": "team", "port": 8080, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}}}
            ]),
        )
        .route(
            "apps",
            "any",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}], "rules": [{"backendRefs": [{"name": "web", "port": 8080}]}]}),
        )
        .route(
            "apps",
            "wrong-section",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "nope"}]}),
        )
        .route(
            "data",
            "not-allowed",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "same"}]}),
        )
        .route(
            "apps",
            "wrong-host",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "all"}], "hostnames": ["other.test"]}),
        )
        .route(
            "infra",
            "local",
            json!({"parentRefs": [{"name": "edge"}], "hostnames": ["a.example.com"]}),
        )
        .route(
            "apps",
            "foreign",
            json!({"parentRefs": [{"name": "theirs", "namespace": "infra"}]}),
        )
        .compute();
    assert_eq!(
        route_verdict(&outcome, "any", "Accepted"),
        vec![(true, "Accepted")]
    );
    assert_eq!(
        route_verdict(&outcome, "wrong-section", "Accepted"),
        vec![(false, "NoMatchingParent")]
    );
    assert_eq!(
        route_verdict(&outcome, "not-allowed", "Accepted"),
        vec![(false, "NotAllowedByListeners")]
    );
    assert_eq!(
        route_verdict(&outcome, "wrong-host", "Accepted"),
        vec![(false, "NoMatchingListenerHostname")]
    );
    assert_eq!(
        route_verdict(&outcome, "local", "Accepted"),
        vec![(true, "Accepted")]
    );
    assert!(
        route_verdict(&outcome, "foreign", "Accepted").is_empty(),
        "a parent that is not Tandem's is not reported"
    );
    // `any` (apps) attaches to `all` and `team`; `local` (infra) to `same`
    // only: `all.test` is not under a.example.com.
    let gateway = &outcome.gateway_status[0];
    let attached: Vec<u32> = gateway
        .listeners
        .iter()
        .map(|l| l.attached_routes)
        .collect();
    assert_eq!(attached, vec![1, 1, 1]);
    let served = &outcome.gateways[0];
    let same = &served.listeners[0];
    assert_eq!(same.routes.len(), 1);
    assert_eq!(same.routes[0].hostnames, vec!["a.example.com"]);
    assert_eq!(
        served.listeners[1].routes[0].hostnames,
        vec!["all.test"],
        "a route without hostnames takes the listener's"
    );
}

#[test]
fn backends_that_do_not_resolve_are_reported_and_answer_for_their_share() {
    let mut cluster = Cluster::new()
        .http_edge()
        .route(
            "apps",
            "missing",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}], "rules": [{"backendRefs": [{"name": "web", "port": 8080, "weight": 3}, {"name": "gone", "port": 80}]}]}),
        )
        .route(
            "apps",
            "cross",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}], "rules": [{"backendRefs": [{"name": "db", "namespace": "data", "port": 5432}]}]}),
        )
        .route(
            "apps",
            "kind",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}], "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "web"}]}]}),
        );
    let outcome = cluster.compute();
    assert_eq!(
        route_verdict(&outcome, "missing", "ResolvedRefs"),
        vec![(false, "BackendNotFound")]
    );
    assert_eq!(
        route_verdict(&outcome, "missing", "Accepted"),
        vec![(true, "Accepted")]
    );
    assert_eq!(
        route_verdict(&outcome, "cross", "ResolvedRefs"),
        vec![(false, "RefNotPermitted")]
    );
    assert_eq!(
        route_verdict(&outcome, "kind", "ResolvedRefs"),
        vec![(false, "InvalidKind")]
    );
    let routes = &outcome.gateways[0].listeners[0].routes;
    let missing = routes.iter().find(|r| r.route.1 == "missing").unwrap();
    assert_eq!(
        missing.rules[0].1,
        vec![
            Backend::Service {
                namespace: "apps".into(),
                name: "web".into(),
                port: 8080,
                weight: 3
            },
            Backend::Invalid { weight: 1 }
        ]
    );

    cluster.grants.push(from(json!({
        "metadata": {"name": "g", "namespace": "data"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "apps"}],
                 "to": [{"group": "", "kind": "Service"}]}
    })));
    assert_eq!(
        route_verdict(&cluster.compute(), "cross", "ResolvedRefs"),
        vec![(true, "ResolvedRefs")]
    );
}

#[test]
fn https_listeners_need_a_certificate_they_may_read() {
    let outcome = Cluster::new()
        .gateway(
            "tls",
            json!([
                {"name": "missing", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "nope"}]}},
                {"name": "foreign", "port": 443, "protocol": "HTTPS", "hostname": "x.test", "tls": {"certificateRefs": [{"name": "cert", "namespace": "data"}]}},
                {"name": "kind", "port": 443, "protocol": "HTTPS", "hostname": "y.test", "tls": {"certificateRefs": [{"group": "example.com", "kind": "Vault", "name": "cert"}]}}
            ]),
        )
        .compute();
    let listeners = &outcome.gateway_status[0].listeners;
    assert_eq!(
        verdict(&listeners[0].conditions, "ResolvedRefs"),
        (false, "InvalidCertificateRef")
    );
    assert_eq!(
        verdict(&listeners[1].conditions, "ResolvedRefs"),
        (false, "RefNotPermitted")
    );
    assert_eq!(
        verdict(&listeners[2].conditions, "ResolvedRefs"),
        (false, "InvalidCertificateRef")
    );
    assert_eq!(
        verdict(&listeners[0].conditions, "Programmed"),
        (false, "Invalid")
    );
    assert!(outcome.gateways[0].listeners.is_empty());
}

#[test]
fn a_gateway_keeps_its_address_and_the_pool_bounds_how_many_are_served() {
    let mut cluster = Cluster::new();
    for name in ["a", "b", "c"] {
        cluster = cluster.gateway(
            name,
            json!([{"name": "http", "port": 80, "protocol": "HTTP"}]),
        );
    }
    cluster.gateways[1].status = Some(from(
        json!({"addresses": [{"type": "IPAddress", "value": "127.0.10.1"}]}),
    ));
    let outcome = cluster.compute();
    let address = |name: &str| {
        outcome
            .gateway_status
            .iter()
            .find(|g| g.key.1 == name)
            .unwrap()
            .address
    };
    assert_eq!(address("b"), Some("127.0.10.1".parse().unwrap()));
    assert_eq!(address("a"), Some("127.0.10.2".parse().unwrap()));
    assert_eq!(address("c"), None);
    let c = outcome
        .gateway_status
        .iter()
        .find(|g| g.key.1 == "c")
        .unwrap();
    assert_eq!(
        verdict(&c.conditions, "Programmed"),
        (false, "AddressNotAssigned")
    );
    assert_eq!(outcome.gateways.len(), 2);
}

#[test]
fn requests_take_the_most_specific_listener_and_host_then_route_precedence() {
    use crate::gateway::table::RoutingTable;
    let mut cluster = Cluster::new()
        .gateway(
            "edge",
            json!([
                {"name": "any", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}},
                {"name": "wild", "port": 80, "protocol": "HTTP", "hostname": "*.example.com", "allowedRoutes": {"namespaces": {"from": "All"}}}
            ]),
        )
        .route(
            "apps",
            "exact-host",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "wild"}], "hostnames": ["a.example.com"],
                   "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "web", "port": 8080}]}]}),
        )
        .route(
            "apps",
            "wild-host",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "wild"}],
                   "rules": [{"matches": [{"path": {"type": "Exact", "value": "/x"}}], "backendRefs": [{"name": "web", "port": 8080}]},
                             {"matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "X-Beta", "value": "1"}]}], "backendRefs": [{"name": "gone", "port": 80}]}]}),
        )
        .route(
            "apps",
            "fallback",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "any"}],
                   "rules": [{"backendRefs": [{"name": "web", "port": 8080, "weight": 0}]}]}),
        );
    cluster.services[0] = from(json!({"metadata": {"name": "web", "namespace": "apps"},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 3000}]}}));
    let slices: Vec<std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>> = vec![
        std::sync::Arc::new(from(json!({
            "metadata": {"name": "web-1", "namespace": "apps", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 3000}],
            "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": true}}, {"addresses": ["10.0.0.8"], "conditions": {"ready": false}}]
        }))),
    ];
    let outcome = cluster.compute();
    let (listeners, targets) =
        super::serve::compile(&outcome, &cluster.services, &slices, &cluster.secrets);
    let table = RoutingTable::default().with_listeners(listeners, targets);
    let at: std::net::SocketAddr = "127.0.10.1:80".parse().unwrap();
    assert_eq!(table.listener_addresses(), vec![at]);
    let route = |host: &str, path: &str, headers: &[(&str, &str)]| {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        table
            .listener_route(at, Some(host), path, "GET", &map)
            .map(|r| (r.name.clone(), r.backends.clone()))
    };
    let web = crate::gateway::table::WorkloadKey::service("apps", "web", 8080);
    // An exact host name is its own virtual host: the wildcard's routes
    // are not considered for it.
    assert_eq!(
        route("a.example.com", "/x", &[]).unwrap().0,
        "httproute:exact-host/0"
    );
    // Under the wildcard: exact path first, then more headers.
    assert_eq!(
        route("b.example.com", "/x", &[("x-beta", "1")]).unwrap().0,
        "httproute:wild-host/0"
    );
    let beta = route("b.example.com", "/y", &[("x-beta", "1")]).unwrap();
    assert_eq!(
        beta.1,
        vec![(crate::gateway::table::WorkloadKey::unresolved(), 1)]
    );
    assert_eq!(route("b.example.com", "/y", &[]), None);
    // Another host takes the listener without a host name; a rule whose
    // every weight is 0 answers 500.
    let fallback = route("other.test", "/", &[]).unwrap();
    assert_eq!(fallback.0, "httproute:fallback/0");
    assert_eq!(
        fallback.1,
        vec![(crate::gateway::table::WorkloadKey::unresolved(), 1)]
    );
    // The Service's target: its ready endpoints on the slice's port.
    let target = table.workload(&web).expect("web target");
    assert_eq!(target.endpoints, vec!["10.0.0.7:3000".parse().unwrap()]);
}

/// Service `apps/web` port 8080 with one ready endpoint: `upstream`.
fn web_backend(
    cluster: &mut Cluster,
    upstream: std::net::SocketAddr,
) -> Vec<std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>> {
    cluster.services[0] = from(json!({"metadata": {"name": "web", "namespace": "apps"},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": upstream.port()}]}}));
    vec![std::sync::Arc::new(from(json!({
        "metadata": {"name": "web-1", "namespace": "apps", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": upstream.port()}],
        "endpoints": [{"addresses": [upstream.ip().to_string()], "conditions": {"ready": true}}]
    })))]
}

/// The gateway serving the tables of `tables` on a loopback port of its
/// own, as the Gateway API listener `at`; the port.
async fn serve_listener(
    tables: tokio::sync::watch::Receiver<std::sync::Arc<crate::gateway::table::RoutingTable>>,
    at: std::net::SocketAddr,
) -> std::net::SocketAddr {
    use std::sync::Arc;
    let metrics = crate::gateway::metrics::GatewayMetrics::register(
        &mut prometheus_client::registry::Registry::default(),
    );
    let engine = Arc::new(crate::gateway::state::Gateway::new(
        crate::gateway::state::Settings::default(),
        tables,
        metrics,
        "test".into(),
    ));
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_at = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let pool = Arc::new(crate::gateway::h1::pool::Pool::default());
        while let Ok((stream, peer)) = front.accept().await {
            tokio::spawn(crate::gateway::connection(
                engine.clone(),
                pool.clone(),
                stream,
                peer,
                crate::gateway::lifecycle::Entry::Listener(at),
                stop.clone(),
            ));
        }
    });
    front_at
}

/// An HTTPRoute's filters, served by the gateway between a real client and
/// upstream on loopback: request headers set, added and removed, the path
/// and host rewritten, response headers edited, and a redirect answered by
/// the gateway without reaching the upstream.
#[tokio::test]
async fn filters_shape_what_the_upstream_gets_and_what_the_client_sees() {
    use crate::gateway::table::RoutingTable;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_at = upstream.local_addr().unwrap();
    let mut cluster = Cluster::new()
        .http_edge()
        .route(
            "apps",
            "shaped",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}],
                   "rules": [
                     {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                      "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                            "set": [{"name": "X-Set", "value": "set"}, {"name": "Content-Length", "value": "0"}],
                            "add": [{"name": "X-Add", "value": "added"}],
                            "remove": ["X-Remove"]}},
                        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                            "set": [{"name": "X-Server", "value": "tandem"}],
                            "remove": ["X-Secret"]}},
                        {"type": "URLRewrite", "urlRewrite": {"hostname": "inside.example",
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
                      "backendRefs": [{"name": "web", "port": 8080}]},
                     {"matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
                      "filters": [{"type": "RequestRedirect", "requestRedirect": {
                          "hostname": "elsewhere.example", "statusCode": 301,
                          "path": {"type": "ReplaceFullPath", "replaceFullPath": "/here"}}}]}
                   ]}),
        );
    let slices = web_backend(&mut cluster, upstream_at);
    let outcome = cluster.compute();
    assert_eq!(
        route_verdict(&outcome, "shaped", "Accepted"),
        [(true, "Accepted")]
    );
    let (listeners, targets) =
        super::serve::compile(&outcome, &cluster.services, &slices, &cluster.secrets);
    let table = RoutingTable::default().with_listeners(listeners, targets);
    let at: std::net::SocketAddr = "127.0.10.1:80".parse().unwrap();
    let (_tables, receiver) = tokio::sync::watch::channel(std::sync::Arc::new(table));
    let front_at = serve_listener(receiver, at).await;
    // The upstream answers once, and hands over the head it got.
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut stream, _) = upstream.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "upstream: closed before a whole head");
            got.extend_from_slice(&buf[..n]);
        }
        let _ = head_tx.send(String::from_utf8(got).unwrap());
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-server: upstream\r\nx-secret: s\r\nx-kept: k\r\n\r\nok")
            .await
            .unwrap();
    });
    let exchange = |request: &'static str| async move {
        let mut client = TcpStream::connect(front_at).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).unwrap()
    };

    let answer = exchange(
        "GET /old/items?id=3 HTTP/1.1\r\nhost: shop.example\r\nx-set: client\r\nx-set: again\r\nx-add: client\r\nx-remove: r\r\nconnection: close\r\n\r\n",
    )
    .await;
    let head = head_rx.await.unwrap().to_ascii_lowercase();
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(lines[0], "get /new/items?id=3 http/1.1", "{head}");
    assert!(lines.contains(&"host: inside.example"), "{head}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("x-set:"))
            .collect::<Vec<_>>(),
        [&"x-set: set"],
        "{head}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("x-add:"))
            .collect::<Vec<_>>(),
        [&"x-add: client", &"x-add: added"],
        "{head}"
    );
    assert!(!head.contains("x-remove"), "{head}");
    assert!(
        !head.contains("content-length"),
        "the framing is the gateway's: {head}"
    );
    let answer = answer.to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-server: tandem\r\n") && !answer.contains("x-server: upstream"),
        "{answer}"
    );
    assert!(
        !answer.contains("x-secret") && answer.contains("x-kept: k"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");

    let answer =
        exchange("GET /moved/a?b=1 HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 301 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nlocation: http://elsewhere.example/here?b=1\r\n"),
        "{answer}"
    );
}

/// A self-signed certificate for `names` as a `kubernetes.io/tls` Secret
/// in `infra`, and its DER for the client to trust and compare.
fn tls_secret(name: &str, names: &[&str]) -> (Secret, Vec<u8>) {
    let certified =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    use k8s_openapi::ByteString;
    let mut secret: Secret = from(json!({
        "metadata": {"name": name, "namespace": "infra"},
        "type": "kubernetes.io/tls"
    }));
    secret.data = Some(
        [
            (
                "tls.crt".to_string(),
                ByteString(certified.cert.pem().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(certified.signing_key.serialize_pem().into_bytes()),
            ),
        ]
        .into(),
    );
    (secret, certified.cert.der().to_vec())
}

/// HTTPS listeners terminate TLS with the certificate of the listener the
/// client names (SNI), and a rotated Secret serves new connections while a
/// connection already up goes on with its own.
#[tokio::test]
async fn https_listeners_pick_their_certificate_by_sni_and_take_a_rotated_one() {
    use crate::gateway::table::RoutingTable;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    // The upstream answers every request on every connection.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_at = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    let (secret_a, der_a) = tls_secret("cert-a", &["a.example"]);
    let (secret_b, der_b) = tls_secret("cert-b", &["*.b.example"]);
    let mut cluster = Cluster::new()
        .gateway(
            "edge",
            json!([
                {"name": "a", "port": 443, "protocol": "HTTPS", "hostname": "a.example",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert-a"}]},
                 "allowedRoutes": {"namespaces": {"from": "All"}}},
                {"name": "b", "port": 443, "protocol": "HTTPS", "hostname": "*.b.example",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert-b"}]},
                 "allowedRoutes": {"namespaces": {"from": "All"}}}
            ]),
        )
        .route(
            "apps",
            "secure",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}],
                   "rules": [{"backendRefs": [{"name": "web", "port": 8080}]}]}),
        );
    cluster.secrets = vec![secret_a, secret_b];
    let slices = web_backend(&mut cluster, upstream_at);
    let build = |cluster: &Cluster| {
        let outcome = cluster.compute();
        let (listeners, targets) =
            super::serve::compile(&outcome, &cluster.services, &slices, &cluster.secrets);
        Arc::new(RoutingTable::default().with_listeners(listeners, targets))
    };
    let at: std::net::SocketAddr = "127.0.10.1:443".parse().unwrap();
    let (tables, receiver) = tokio::sync::watch::channel(build(&cluster));
    assert!(tables.borrow().listener_tls(at));
    let front_at = serve_listener(receiver, at).await;

    // The client trusts every certificate of the test and reports which
    // one it was shown.
    let trusting = |ders: &[&Vec<u8>]| {
        let mut roots = rustls::RootCertStore::empty();
        for der in ders {
            roots
                .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
                .unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    type Tls = tokio_rustls::client::TlsStream<TcpStream>;
    let connect = async |connector: &tokio_rustls::TlsConnector,
                         name: &'static str|
           -> Result<(Tls, Vec<u8>), String> {
        let tcp = TcpStream::connect(front_at).await.unwrap();
        let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok((tls, shown))
    };
    let get = async |tls: &mut Tls, host: &str| -> String {
        let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.ends_with(b"\r\n\r\nok") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(answer).unwrap()
    };
    let connector = trusting(&[&der_a, &der_b]);
    let (mut on_a, shown) = connect(&connector, "a.example").await.unwrap();
    assert_eq!(shown, der_a);
    assert!(
        get(&mut on_a, "a.example")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let (mut on_b, shown) = connect(&connector, "x.b.example").await.unwrap();
    assert_eq!(shown, der_b);
    assert!(
        get(&mut on_b, "x.b.example")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // No listener has this name and none is without one: no certificate.
    assert!(connect(&connector, "c.example").await.is_err());

    // The Secret of listener a is rotated.
    let (rotated, der_rotated) = tls_secret("cert-a", &["a.example"]);
    cluster.secrets[0] = rotated;
    tables.send_replace(build(&cluster));
    let connector = trusting(&[&der_a, &der_b, &der_rotated]);
    let (mut fresh, shown) = connect(&connector, "a.example").await.unwrap();
    assert_eq!(
        shown, der_rotated,
        "a new connection gets the new certificate"
    );
    assert!(
        get(&mut fresh, "a.example")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // The connection made before goes on.
    assert!(
        get(&mut on_a, "a.example")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

/// A backendRef to a workload's public Service that points at the gateways
/// is that workload (cold path, measured); one whose public Service selects
/// its pods (scaled on CPU) is a plain Service, reached through its slices.
#[test]
fn public_services_that_point_at_the_gateways_are_their_workloads() {
    let public = |name: &str, workload: &str, selector: Value| -> Service {
        from(
            json!({"metadata": {"name": name, "namespace": "apps", "labels": {
                "tandem.dev/service": "public", "tandem.dev/app": "shop", "tandem.dev/workload": workload}},
            "spec": {"ports": [{"name": "http", "port": 80}], "selector": selector}}),
        )
    };
    let mut cluster = Cluster::new().http_edge().route(
        "apps",
        "both",
        json!({"parentRefs": [{"name": "edge", "namespace": "infra"}],
               "rules": [{"backendRefs": [{"name": "shop-thumbs", "port": 80}, {"name": "shop-store", "port": 80}]}]}),
    );
    cluster.services = vec![
        public("shop-thumbs", "thumbs", json!(null)),
        public("shop-store", "store", json!({"tandem.dev/app": "shop"})),
    ];
    let outcome = cluster.compute();
    let (listeners, _) = super::serve::compile(&outcome, &cluster.services, &[], &cluster.secrets);
    let at: std::net::SocketAddr = "127.0.10.1:80".parse().unwrap();
    let set = listeners.get(&at).expect("the listener");
    let backends: Vec<_> = set.listeners[0].1.any[0]
        .backends
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    use crate::gateway::table::WorkloadKey;
    assert_eq!(
        backends,
        [
            WorkloadKey {
                namespace: "apps".into(),
                app: "shop".into(),
                workload: "thumbs".into()
            },
            WorkloadKey::service("apps", "shop-store", 80),
        ]
    );
}
