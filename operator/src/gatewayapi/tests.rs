use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use serde_json::{Value, json};

use super::attach::{Backend, Condition, Outcome, World, compute};
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

    fn route(mut self, namespace: &str, name: &str, spec: Value) -> Self {
        self.routes.push(from(json!({
            "metadata": {"name": name, "namespace": namespace, "generation": 5},
            "spec": spec
        })));
        self
    }

    fn compute(&self) -> Outcome {
        compute(&World {
            controller: "tandem.dev/gateway",
            classes: &self.classes,
            gateways: &self.gateways,
            routes: &self.routes,
            grants: &self.grants,
            services: &self.services,
            secrets: &self.secrets,
            namespaces: &self.namespaces,
            addresses: &self.addresses,
        })
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
        .gateway(
            "edge",
            json!([{"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}]),
        )
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
    let (listeners, targets) = super::serve::compile(&outcome, &cluster.services, &slices);
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
