//! From the Gateway API objects of the cluster to what Tandem serves and
//! what it reports: which GatewayClasses it accepts, which listeners of its
//! Gateways are valid, which routes attach to which listeners, which
//! backends resolve, and the status of each object as the spec asks
//! (conditions with their reasons and `observedGeneration`, listener
//! `supportedKinds` and `attachedRoutes`, route `parents`).
//!
//! Pure: the same objects give the same result, so every gateway replica
//! computes the same listeners, and the one that writes status writes what
//! all of them serve.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use serde_json::{Value, json};

use super::hostname;
use super::model::{
    GROUP, Gateway, GatewayClass, HttpBackendRef, HttpRoute, HttpRouteRule, Listener,
    ParentReference, ReferenceGrant,
};

/// The cluster's Gateway API objects and what they refer to.
#[derive(Default)]
pub struct World<'a> {
    /// The `controllerName` of Tandem's classes.
    pub controller: &'a str,
    /// Every GatewayClass.
    pub classes: &'a [GatewayClass],
    /// Every Gateway.
    pub gateways: &'a [Gateway],
    /// Every HTTPRoute.
    pub routes: &'a [HttpRoute],
    /// Every ReferenceGrant.
    pub grants: &'a [ReferenceGrant],
    /// Services (backends).
    pub services: &'a [Service],
    /// Secrets of type `kubernetes.io/tls` (certificates).
    pub secrets: &'a [Secret],
    /// Namespaces (their labels, for `allowedRoutes` selectors).
    pub namespaces: &'a [Namespace],
    /// The addresses Gateways are given.
    pub addresses: &'a [IpAddr],
}

/// A namespaced name.
pub type Key = (String, String);

/// A condition without its transition time (the writer keeps the previous
/// time while the status stays the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Type.
    pub kind: &'static str,
    /// `"True"` or `"False"`.
    pub status: bool,
    /// Reason.
    pub reason: &'static str,
    /// A sentence.
    pub message: String,
    /// The generation it describes.
    pub observed_generation: i64,
}

fn condition(
    kind: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
    generation: i64,
) -> Condition {
    Condition {
        kind,
        status,
        reason,
        message: message.into(),
        observed_generation: generation,
    }
}

impl Condition {
    /// As JSON, with `lastTransitionTime` = `time`.
    pub fn to_json(&self, time: &str) -> Value {
        json!({
            "type": self.kind,
            "status": if self.status { "True" } else { "False" },
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.observed_generation,
            "lastTransitionTime": time,
        })
    }
}

/// A backend of a rule as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A Service port: namespace, name, port.
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Service port.
        port: i32,
        /// Weight.
        weight: u32,
    },
    /// A reference that does not resolve: its share of requests gets 500.
    Invalid {
        /// Weight.
        weight: u32,
    },
}

/// A route attached to a listener.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The route.
    pub route: Key,
    /// When it was made (older routes win ties).
    pub created: String,
    /// The host names it serves on this listener (empty: any).
    pub hostnames: Vec<String>,
    /// Its rules, backends resolved.
    pub rules: Vec<(HttpRouteRule, Vec<Backend>)>,
}

/// A listener Tandem serves.
#[derive(Debug, Clone)]
pub struct ServedListener {
    /// Its name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Serves TLS (HTTPS).
    pub tls: bool,
    /// Host name (none: any).
    pub hostname: Option<String>,
    /// Certificate Secrets (namespace, name).
    pub certificates: Vec<Key>,
    /// Routes attached to it.
    pub routes: Vec<Attached>,
}

/// A Gateway Tandem serves.
#[derive(Debug, Clone)]
pub struct ServedGateway {
    /// Which.
    pub key: Key,
    /// Its address (none: the pool is used up).
    pub address: Option<IpAddr>,
    /// Its valid listeners.
    pub listeners: Vec<ServedListener>,
}

/// Status of one listener.
#[derive(Debug, Clone)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Route kinds it takes.
    pub supported_kinds: Vec<&'static str>,
    /// Routes attached.
    pub attached_routes: u32,
    /// Conditions.
    pub conditions: Vec<Condition>,
}

/// Status of one Gateway.
#[derive(Debug, Clone)]
pub struct GatewayStatus {
    /// Which.
    pub key: Key,
    /// Conditions.
    pub conditions: Vec<Condition>,
    /// Its address.
    pub address: Option<IpAddr>,
    /// Listeners, in spec order.
    pub listeners: Vec<ListenerStatus>,
}

/// What one parent says about a route.
#[derive(Debug, Clone)]
pub struct RouteParentStatus {
    /// The parent as the route names it.
    pub parent: ParentReference,
    /// Conditions (Accepted, ResolvedRefs).
    pub conditions: Vec<Condition>,
}

/// Everything computed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Status of Tandem's classes: name and conditions.
    pub classes: Vec<(String, Vec<Condition>)>,
    /// What to serve.
    pub gateways: Vec<ServedGateway>,
    /// Status of Tandem's Gateways.
    pub gateway_status: Vec<GatewayStatus>,
    /// Status of routes, for Tandem's parents only.
    pub route_status: Vec<(Key, Vec<RouteParentStatus>)>,
}

/// The route kinds Tandem serves.
pub const HTTP_ROUTE: &str = "HTTPRoute";

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn is_core_group(group: Option<&str>) -> bool {
    group.is_none_or(|g| g.is_empty())
}

impl World<'_> {
    /// Whether a grant in `to_namespace` lets a `from_kind` of `from_group`
    /// in `from_namespace` refer to the `to_kind` named `to_name`.
    fn granted(
        &self,
        (from_group, from_kind, from_namespace): (&str, &str, &str),
        (to_group, to_kind, to_namespace, to_name): (&str, &str, &str, &str),
    ) -> bool {
        self.grants
            .iter()
            .filter(|g| g.metadata.namespace.as_deref() == Some(to_namespace))
            .any(|g| {
                g.spec.from.iter().any(|f| {
                    f.group == from_group && f.kind == from_kind && f.namespace == from_namespace
                }) && g.spec.to.iter().any(|t| {
                    t.group == to_group
                        && t.kind == to_kind
                        && t.name.as_deref().is_none_or(|n| n == to_name)
                })
            })
    }

    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
    }
}

/// Whether a label selector (match labels and expressions) selects `labels`.
pub fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// A listener's verdict before routes attach.
struct Checked<'a> {
    listener: &'a Listener,
    /// Accepted (and so may serve).
    accepted: bool,
    /// Routes may attach (accepted and the kinds allow HTTPRoute).
    takes_routes: bool,
    status: ListenerStatus,
    certificates: Vec<Key>,
    programmed: bool,
}

fn check_listener<'a>(
    world: &World<'_>,
    gateway: &Gateway,
    listener: &'a Listener,
    conflicted: Option<&'static str>,
) -> Checked<'a> {
    let generation = gateway.metadata.generation.unwrap_or_default();
    let (namespace, _) = key_of(&gateway.metadata);
    let mut conditions = Vec::new();
    let protocol_ok = matches!(listener.protocol.as_str(), "HTTP" | "HTTPS");
    // Kinds: HTTPRoute is the one route kind of HTTP and HTTPS.
    let mut kinds_ok = true;
    let supported_kinds: Vec<&'static str> = if !protocol_ok {
        Vec::new()
    } else {
        match listener
            .allowed_routes
            .as_ref()
            .and_then(|a| a.kinds.as_ref())
        {
            None => vec![HTTP_ROUTE],
            Some(kinds) => {
                let mut supported = Vec::new();
                for kind in kinds {
                    if kind.group.as_deref().is_none_or(|g| g == GROUP) && kind.kind == HTTP_ROUTE {
                        if !supported.contains(&HTTP_ROUTE) {
                            supported.push(HTTP_ROUTE);
                        }
                    } else {
                        kinds_ok = false;
                    }
                }
                supported
            }
        }
    };
    let mut refs: Result<(), (&'static str, String)> = Ok(());
    let mut certificates = Vec::new();
    if listener.protocol == "HTTPS" {
        let tls = listener.tls.as_ref();
        let refs_given = tls.map(|t| t.certificate_refs.as_slice()).unwrap_or(&[]);
        if tls
            .and_then(|t| t.mode.as_deref())
            .is_some_and(|m| m != "Terminate")
        {
            refs = Err((
                "InvalidCertificateRef",
                "HTTPS listeners terminate TLS; Passthrough needs a TLS listener".into(),
            ));
        } else if refs_given.is_empty() {
            refs = Err((
                "InvalidCertificateRef",
                "an HTTPS listener needs a certificateRef".into(),
            ));
        }
        for reference in refs_given {
            if refs.is_err() {
                break;
            }
            let secret_namespace = reference.namespace.clone().unwrap_or(namespace.clone());
            if !is_core_group(reference.group.as_deref())
                || reference.kind.as_deref().is_some_and(|k| k != "Secret")
            {
                refs = Err((
                    "InvalidCertificateRef",
                    format!("certificateRef {} is not a Secret", reference.name),
                ));
            } else if secret_namespace != namespace
                && !world.granted(
                    (GROUP, "Gateway", &namespace),
                    ("", "Secret", &secret_namespace, &reference.name),
                )
            {
                refs = Err((
                    "RefNotPermitted",
                    format!(
                        "no ReferenceGrant in {secret_namespace} lets Gateways of {namespace} use Secret {}",
                        reference.name
                    ),
                ));
            } else if !world
                .secret(&secret_namespace, &reference.name)
                .is_some_and(super::tls::usable)
            {
                refs = Err((
                    "InvalidCertificateRef",
                    format!(
                        "Secret {secret_namespace}/{} is missing or holds no valid certificate and key",
                        reference.name
                    ),
                ));
            } else {
                certificates.push((secret_namespace, reference.name.clone()));
            }
        }
    }
    let accepted = protocol_ok && conflicted.is_none();
    if !protocol_ok {
        conditions.push(condition(
            "Accepted",
            false,
            "UnsupportedProtocol",
            format!(
                "protocol {} is not supported (HTTP and HTTPS are)",
                listener.protocol
            ),
            generation,
        ));
    } else {
        conditions.push(condition(
            "Accepted",
            true,
            "Accepted",
            "listener accepted",
            generation,
        ));
    }
    let resolved = match (&refs, kinds_ok) {
        (Err((reason, message)), _) => {
            condition("ResolvedRefs", false, reason, message.clone(), generation)
        }
        (Ok(()), false) => condition(
            "ResolvedRefs",
            false,
            "InvalidRouteKinds",
            "only HTTPRoute of gateway.networking.k8s.io is supported",
            generation,
        ),
        (Ok(()), true) => condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved",
            generation,
        ),
    };
    let programmed = accepted && refs.is_ok() && resolved.status;
    conditions.push(resolved);
    conditions.push(match conflicted {
        Some(reason) => condition(
            "Conflicted",
            true,
            reason,
            "another listener on this port conflicts",
            generation,
        ),
        None => condition(
            "Conflicted",
            false,
            "NoConflicts",
            "no conflicts",
            generation,
        ),
    });
    conditions.push(if programmed {
        condition("Programmed", true, "Programmed", "serving", generation)
    } else {
        condition(
            "Programmed",
            false,
            "Invalid",
            "listener is not valid",
            generation,
        )
    });
    Checked {
        listener,
        accepted,
        takes_routes: accepted && !supported_kinds.is_empty(),
        status: ListenerStatus {
            name: listener.name.clone(),
            supported_kinds,
            attached_routes: 0,
            conditions,
        },
        certificates,
        programmed,
    }
}

/// Listeners that share a port conflict when their protocols differ, or
/// when they have one protocol and one host name.
fn conflicts(listeners: &[Listener]) -> Vec<Option<&'static str>> {
    listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let others = listeners
                .iter()
                .enumerate()
                .filter(|(j, o)| *j != i && o.port == l.port);
            let mut verdict = None;
            for (_, other) in others {
                if other.protocol != l.protocol {
                    verdict = Some("ProtocolConflict");
                    break;
                }
                if other.hostname == l.hostname {
                    verdict = Some("HostnameConflict");
                }
            }
            verdict
        })
        .collect()
}

/// Whether `listener` of `gateway` lets a route of `route_namespace` attach.
fn allows_namespace(
    world: &World<'_>,
    gateway_namespace: &str,
    listener: &Listener,
    route_namespace: &str,
) -> bool {
    let from = listener
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => from
            .and_then(|f| f.selector.as_ref())
            .is_some_and(|s| selects(s, &world.namespace_labels(route_namespace))),
        _ => gateway_namespace == route_namespace,
    }
}

/// The backends of a rule, resolved, and the first reason one did not.
fn resolve_backends(
    world: &World<'_>,
    namespace: &str,
    refs: &[HttpBackendRef],
) -> (Vec<Backend>, Option<(&'static str, String)>) {
    let mut problem = None;
    let backends = refs
        .iter()
        .map(|r| {
            let weight = r.weight.unwrap_or(1);
            let target_namespace = r.namespace.clone().unwrap_or(namespace.to_string());
            let verdict: Result<i32, (&'static str, String)> =
                if !is_core_group(r.group.as_deref())
                    || r.kind.as_deref().is_some_and(|k| k != "Service")
                {
                    Err((
                        "InvalidKind",
                        format!("backendRef {} is not a Service", r.name),
                    ))
                } else if target_namespace != namespace
                    && !world.granted(
                        (GROUP, HTTP_ROUTE, namespace),
                        ("", "Service", &target_namespace, &r.name),
                    )
                {
                    Err((
                        "RefNotPermitted",
                        format!(
                            "no ReferenceGrant in {target_namespace} lets HTTPRoutes of {namespace} use Service {}",
                            r.name
                        ),
                    ))
                } else if world.service(&target_namespace, &r.name).is_none() {
                    Err((
                        "BackendNotFound",
                        format!("Service {target_namespace}/{} does not exist", r.name),
                    ))
                } else {
                    match r.port {
                        Some(port) => Ok(port),
                        None => Err((
                            "UnsupportedValue",
                            format!("backendRef {} needs a port", r.name),
                        )),
                    }
                };
            match verdict {
                Ok(port) => Backend::Service {
                    namespace: target_namespace,
                    name: r.name.clone(),
                    port,
                    weight,
                },
                Err(reason) => {
                    problem.get_or_insert(reason);
                    Backend::Invalid { weight }
                }
            }
        })
        .collect();
    (backends, problem)
}

/// Assigns addresses: a Gateway keeps the one its status shows when that is
/// still in the pool and free; the others take free ones in order of age.
fn assign_addresses(world: &World<'_>, ours: &[&Gateway]) -> HashMap<Key, IpAddr> {
    let mut taken: HashMap<IpAddr, Key> = HashMap::new();
    let mut assigned = HashMap::new();
    for gateway in ours {
        let key = key_of(&gateway.metadata);
        let previous = gateway
            .status
            .iter()
            .flat_map(|s| s["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| a["value"].as_str()?.parse::<IpAddr>().ok())
            .find(|ip| world.addresses.contains(ip) && !taken.contains_key(ip));
        if let Some(ip) = previous {
            taken.insert(ip, key.clone());
            assigned.insert(key, ip);
        }
    }
    for gateway in ours {
        let key = key_of(&gateway.metadata);
        if assigned.contains_key(&key) {
            continue;
        }
        if let Some(ip) = world
            .addresses
            .iter()
            .find(|ip| !taken.contains_key(ip))
            .copied()
        {
            taken.insert(ip, key.clone());
            assigned.insert(key, ip);
        }
    }
    assigned
}

/// Computes what Tandem serves and reports.
pub fn compute(world: &World<'_>) -> Outcome {
    let mut outcome = Outcome::default();
    let our_classes: Vec<&GatewayClass> = world
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == world.controller)
        .collect();
    for class in &our_classes {
        let generation = class.metadata.generation.unwrap_or_default();
        let accepted = if class.spec.parameters_ref.is_some() {
            condition(
                "Accepted",
                false,
                "InvalidParameters",
                "Tandem's GatewayClass takes no parameters",
                generation,
            )
        } else {
            condition(
                "Accepted",
                true,
                "Accepted",
                "Tandem serves this class",
                generation,
            )
        };
        outcome.classes.push((
            class.metadata.name.clone().unwrap_or_default(),
            vec![accepted],
        ));
    }
    let accepted_class = |name: &str| {
        our_classes
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some(name) && c.spec.parameters_ref.is_none())
    };
    let mut ours: Vec<&Gateway> = world
        .gateways
        .iter()
        .filter(|g| accepted_class(&g.spec.gateway_class_name))
        .collect();
    ours.sort_by_key(|g| {
        (
            g.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            key_of(&g.metadata),
        )
    });
    let addresses = assign_addresses(world, &ours);

    // Listeners first, then routes attach to them.
    let mut checked: Vec<(Key, &Gateway, Vec<Checked<'_>>)> = ours
        .iter()
        .map(|g| {
            let conflicted = conflicts(&g.spec.listeners);
            let listeners = g
                .spec
                .listeners
                .iter()
                .zip(conflicted)
                .map(|(l, c)| check_listener(world, g, l, c))
                .collect();
            (key_of(&g.metadata), *g, listeners)
        })
        .collect();
    let mut attached: HashMap<(Key, String), Vec<Attached>> = HashMap::new();

    let mut routes: Vec<&HttpRoute> = world.routes.iter().collect();
    routes.sort_by_key(|r| key_of(&r.metadata));
    for route in routes {
        let route_key = key_of(&route.metadata);
        let (route_namespace, _) = route_key.clone();
        let generation = route.metadata.generation.unwrap_or_default();
        let mut rules = Vec::new();
        let mut problem = None;
        for rule in &route.spec.rules {
            let (backends, issue) = resolve_backends(world, &route_namespace, &rule.backend_refs);
            if problem.is_none() {
                problem = issue;
            }
            rules.push((rule.clone(), backends));
        }
        let unsupported_filter = route
            .spec
            .rules
            .iter()
            .flat_map(|r| {
                let on_rule = r
                    .filters
                    .iter()
                    .filter(|f| !super::SUPPORTED_FILTERS.contains(&f.kind.as_str()))
                    .map(|f| f.kind.clone());
                // Filters of one backend are not served yet.
                let on_backend = r
                    .backend_refs
                    .iter()
                    .flat_map(|b| b.filters.iter())
                    .map(|f| format!("{} (on a backendRef)", f.kind));
                on_rule.chain(on_backend)
            })
            .next();
        let mut parents = Vec::new();
        for parent in &route.spec.parent_refs {
            if parent.group.as_deref().is_some_and(|g| g != GROUP)
                || parent.kind.as_deref().is_some_and(|k| k != "Gateway")
            {
                continue;
            }
            let parent_namespace = parent.namespace.clone().unwrap_or(route_namespace.clone());
            let Some((gateway_key, gateway, listeners)) = checked
                .iter_mut()
                .find(|(k, _, _)| k.0 == parent_namespace && k.1 == parent.name)
            else {
                // Not a Gateway of Tandem's (or not there): not ours to report.
                continue;
            };
            let gateway_namespace = gateway_key.0.clone();
            let _ = gateway;
            let mut candidates: Vec<&mut Checked<'_>> = listeners
                .iter_mut()
                .filter(|c| {
                    parent
                        .section_name
                        .as_deref()
                        .is_none_or(|s| c.listener.name == s)
                        && parent.port.is_none_or(|p| c.listener.port == p)
                })
                .collect();
            let accepted = if candidates.is_empty() {
                condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    "no listener matches the parentRef's sectionName and port",
                    generation,
                )
            } else {
                candidates.retain(|c| {
                    c.takes_routes
                        && allows_namespace(world, &gateway_namespace, c.listener, &route_namespace)
                });
                if candidates.is_empty() {
                    condition(
                        "Accepted",
                        false,
                        "NotAllowedByListeners",
                        "no listener allows this route",
                        generation,
                    )
                } else {
                    let with_names: Vec<(&mut Checked<'_>, Vec<String>)> = candidates
                        .into_iter()
                        .filter_map(|c| {
                            let names = hostname::intersect(
                                c.listener.hostname.as_deref(),
                                &route.spec.hostnames,
                            )?;
                            Some((c, names))
                        })
                        .collect();
                    if with_names.is_empty() {
                        condition(
                            "Accepted",
                            false,
                            "NoMatchingListenerHostname",
                            "no listener's hostname matches the route's hostnames",
                            generation,
                        )
                    } else if let Some(kind) = &unsupported_filter {
                        condition(
                            "Accepted",
                            false,
                            "UnsupportedValue",
                            format!("filter {kind} is not supported"),
                            generation,
                        )
                    } else {
                        for (listener, names) in with_names {
                            listener.status.attached_routes += 1;
                            if listener.programmed {
                                attached
                                    .entry((gateway_key.clone(), listener.listener.name.clone()))
                                    .or_default()
                                    .push(Attached {
                                        route: route_key.clone(),
                                        created: route
                                            .metadata
                                            .creation_timestamp
                                            .as_ref()
                                            .map(|t| t.0.to_string())
                                            .unwrap_or_default(),
                                        hostnames: names,
                                        rules: rules.clone(),
                                    });
                            }
                        }
                        condition("Accepted", true, "Accepted", "route accepted", generation)
                    }
                }
            };
            let resolved = match &problem {
                Some((reason, message)) => {
                    condition("ResolvedRefs", false, reason, message.clone(), generation)
                }
                None => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "all references resolved",
                    generation,
                ),
            };
            parents.push(RouteParentStatus {
                parent: parent.clone(),
                conditions: vec![accepted, resolved],
            });
        }
        if !parents.is_empty() {
            outcome.route_status.push((route_key, parents));
        }
    }

    for (key, gateway, listeners) in checked.iter_mut() {
        let generation = gateway.metadata.generation.unwrap_or_default();
        let address = addresses.get(key).copied();
        let valid = listeners.iter().filter(|c| c.accepted).count();
        let all_valid = listeners.iter().all(|c| c.programmed);
        let unsupported_address = gateway
            .spec
            .addresses
            .iter()
            .find(|a| a.kind.as_deref().is_some_and(|k| k != "IPAddress"));
        let requested: Vec<IpAddr> = gateway
            .spec
            .addresses
            .iter()
            .filter_map(|a| a.value.as_deref()?.parse().ok())
            .collect();
        let mut conditions = Vec::new();
        conditions.push(if let Some(a) = unsupported_address {
            condition(
                "Accepted",
                false,
                "UnsupportedAddress",
                format!(
                    "address type {} is not supported (IPAddress is)",
                    a.kind.clone().unwrap_or_default()
                ),
                generation,
            )
        } else if valid == 0 {
            condition(
                "Accepted",
                false,
                "ListenersNotValid",
                "no listener is valid",
                generation,
            )
        } else if !all_valid {
            condition(
                "Accepted",
                true,
                "ListenersNotValid",
                "some listeners are not valid",
                generation,
            )
        } else {
            condition("Accepted", true, "Accepted", "Gateway accepted", generation)
        });
        let usable = requested.iter().all(|ip| Some(*ip) == address);
        conditions.push(match address {
            _ if !usable => condition(
                "Programmed",
                false,
                "AddressNotUsable",
                "Tandem serves Gateways on the addresses of its pool only",
                generation,
            ),
            Some(ip) if valid > 0 => condition(
                "Programmed",
                true,
                "Programmed",
                format!("serving on {ip}"),
                generation,
            ),
            Some(_) => condition(
                "Programmed",
                false,
                "Invalid",
                "no valid listener",
                generation,
            ),
            None => condition(
                "Programmed",
                false,
                "AddressNotAssigned",
                "every address of the pool is taken",
                generation,
            ),
        });
        let served: Vec<ServedListener> = listeners
            .iter()
            .filter(|c| c.programmed)
            .map(|c| ServedListener {
                name: c.listener.name.clone(),
                port: c.listener.port,
                tls: c.listener.protocol == "HTTPS",
                hostname: c.listener.hostname.clone(),
                certificates: c.certificates.clone(),
                routes: attached
                    .remove(&(key.clone(), c.listener.name.clone()))
                    .unwrap_or_default(),
            })
            .collect();
        if usable && address.is_some() {
            outcome.gateways.push(ServedGateway {
                key: key.clone(),
                address,
                listeners: served,
            });
        }
        outcome.gateway_status.push(GatewayStatus {
            key: key.clone(),
            conditions,
            address,
            listeners: listeners.iter().map(|c| c.status.clone()).collect(),
        });
    }
    outcome
}
