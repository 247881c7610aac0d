//! From attached routes to the gateway's routing table: one compiled route
//! per match of every rule, grouped by listener address, host name and
//! virtual host; and a target per backend Service with its ready endpoints.
//!
//! A backend Service that is the public face of a HybridApp workload (a
//! Function, say) becomes that workload: an HTTPRoute to it gets the cold
//! path (held, woken, released) like a HybridApp route.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::attach::{Attached, Backend, Outcome};
use crate::api::{Method, Mode, labels};
use crate::gateway::table::{
    CompiledRoute, FastMap, ListenerSet, PathMatch, VirtualHosts, WorkloadKey, WorkloadTarget,
};

/// Deadline of one request to a plain Service backend (the gateway's
/// response-head and idle timeouts apply as well).
pub const SERVICE_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The listener sets and backend targets for `outcome`.
pub fn compile(
    outcome: &Outcome,
    services: &[Service],
    slices: &[Arc<EndpointSlice>],
) -> (FastMap<SocketAddr, Arc<ListenerSet>>, Vec<WorkloadTarget>) {
    // Older routes win ties, then by namespace and name.
    let mut ranks: Vec<(String, (String, String))> = outcome
        .gateways
        .iter()
        .flat_map(|g| g.listeners.iter())
        .flat_map(|l| l.routes.iter())
        .map(|a| (a.created.clone(), a.route.clone()))
        .collect();
    ranks.sort();
    ranks.dedup();
    let rank: HashMap<(String, String), u32> = ranks
        .into_iter()
        .enumerate()
        .map(|(i, (_, key))| (key, i as u32))
        .collect();

    let mut targets: HashMap<WorkloadKey, WorkloadTarget> = HashMap::new();
    let mut sets: HashMap<SocketAddr, ListenerSet> = HashMap::new();
    for gateway in &outcome.gateways {
        let Some(address) = gateway.address else {
            continue;
        };
        for listener in &gateway.listeners {
            let mut hosts = VirtualHosts::default();
            for attached in &listener.routes {
                let tie = rank.get(&attached.route).copied().unwrap_or_default();
                let routes = compile_route(attached, tie, services, slices, &mut targets);
                if attached.hostnames.is_empty() {
                    hosts.any.extend(routes);
                    continue;
                }
                for name in &attached.hostnames {
                    match name.strip_prefix('*') {
                        Some(suffix) => {
                            match hosts.wildcard.iter_mut().find(|(s, _)| s == suffix) {
                                Some((_, list)) => list.extend(routes.iter().cloned()),
                                None => hosts.wildcard.push((suffix.to_string(), routes.clone())),
                            }
                        }
                        None => hosts
                            .exact
                            .entry(name.clone())
                            .or_default()
                            .extend(routes.iter().cloned()),
                    }
                }
            }
            hosts.seal();
            sets.entry(SocketAddr::new(address, listener.port))
                .or_default()
                .push(listener.hostname.clone(), hosts);
        }
    }
    (
        sets.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        targets.into_values().collect(),
    )
}

fn compile_route(
    attached: &Attached,
    rank: u32,
    services: &[Service],
    slices: &[Arc<EndpointSlice>],
    targets: &mut HashMap<WorkloadKey, WorkloadTarget>,
) -> Vec<Arc<CompiledRoute>> {
    let (namespace, name) = &attached.route;
    let mut compiled = Vec::new();
    for (index, (rule, backends)) in attached.rules.iter().enumerate() {
        let mut weighted: Vec<(WorkloadKey, u32)> = Vec::new();
        for backend in backends {
            match backend {
                Backend::Invalid { weight } if *weight > 0 => {
                    weighted.push((WorkloadKey::unresolved(), *weight))
                }
                Backend::Invalid { .. } => {}
                Backend::Service {
                    namespace,
                    name,
                    port,
                    weight,
                } => {
                    if *weight == 0 {
                        continue;
                    }
                    let key = backend_key(namespace, name, *port, services, slices, targets);
                    weighted.push((key, *weight));
                }
            }
        }
        // No backend, or every weight 0: every request is answered 500.
        if weighted.is_empty() {
            weighted.push((WorkloadKey::unresolved(), 1));
        }
        let total: u32 = weighted.iter().map(|(_, w)| w).sum();
        let rule_name = rule.name.clone().unwrap_or_else(|| index.to_string());
        let default_match = [Default::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        for m in matches {
            let path = match &m.path {
                None => PathMatch::Prefix("/".into()),
                Some(p) => {
                    let value = p.value.clone().unwrap_or_else(|| "/".into());
                    match p.kind.as_deref().unwrap_or("PathPrefix") {
                        "Exact" => PathMatch::Exact(value),
                        "PathPrefix" => {
                            let trimmed = value.trim_end_matches('/');
                            PathMatch::Prefix(if trimmed.is_empty() {
                                "/".into()
                            } else {
                                trimmed.into()
                            })
                        }
                        // Regular expressions are not served: the match
                        // never applies.
                        _ => continue,
                    }
                }
            };
            if m.headers
                .iter()
                .any(|h| h.kind.as_deref().is_some_and(|k| k != "Exact"))
                || !m.query_params.is_empty()
            {
                continue;
            }
            let methods: Vec<Method> = match &m.method {
                None => Vec::new(),
                Some(method) => match serde_json::from_value::<Method>(serde_json::json!(method)) {
                    Ok(method) => vec![method],
                    Err(_) => continue,
                },
            };
            compiled.push(Arc::new(CompiledRoute {
                namespace: namespace.clone(),
                app: String::new(),
                name: format!("httproute:{name}/{rule_name}"),
                host_specific: true,
                path,
                methods,
                headers: m
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                    .collect(),
                backends: weighted.clone(),
                total_weight: total,
                measured: false,
                rolls: Default::default(),
                tie: rank.saturating_mul(1024).saturating_add(index as u32),
            }));
        }
    }
    compiled
}

/// The workload a backend Service port stands for: the HybridApp workload
/// whose public Service it is, or the Service port itself (added to
/// `targets` with its ready endpoints).
fn backend_key(
    namespace: &str,
    name: &str,
    port: i32,
    services: &[Service],
    slices: &[Arc<EndpointSlice>],
    targets: &mut HashMap<WorkloadKey, WorkloadTarget>,
) -> WorkloadKey {
    let service = services.iter().find(|s| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && s.metadata.name.as_deref() == Some(name)
    });
    if let Some(own) = service
        .and_then(|s| s.metadata.labels.as_ref())
        .filter(|l| l.get(labels::SERVICE).is_some_and(|k| k == labels::PUBLIC))
        && let (Some(app), Some(workload)) = (own.get(labels::APP), own.get(labels::WORKLOAD))
    {
        return WorkloadKey {
            namespace: namespace.into(),
            app: app.clone(),
            workload: workload.clone(),
        };
    }
    let key = WorkloadKey::service(namespace, name, port);
    if targets.contains_key(&key) {
        return key;
    }
    let port_name = service
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == port))
        .map(|p| p.name.clone().unwrap_or_default());
    let mut endpoints = Vec::new();
    if let Some(port_name) = port_name {
        for slice in slices.iter().filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(labels::SERVICE_NAME))
                    .is_some_and(|n| n == name)
        }) {
            let Some(target_port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                if !ready || terminating {
                    continue;
                }
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        endpoints.push(SocketAddr::new(ip, target_port));
                    }
                }
            }
        }
    }
    endpoints.sort();
    endpoints.dedup();
    targets.insert(
        key.clone(),
        WorkloadTarget {
            key: key.clone(),
            mode: Mode::AlwaysOn,
            request_timeout: SERVICE_REQUEST_TIMEOUT,
            endpoints,
        },
    );
    key
}
