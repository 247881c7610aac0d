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

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::attach::{Attached, Backend, Outcome};
use crate::api::{Method, Mode, labels};
use crate::gateway::filters::{Filters, HeaderEdits, PathChange, Redirect, Rewrite};
use crate::gateway::table::{
    CompiledRoute, FastMap, ListenerSet, PathMatch, VirtualHosts, WorkloadKey, WorkloadTarget,
};

/// Deadline of one request to a plain Service backend (the gateway's
/// response-head and idle timeouts apply as well).
pub const SERVICE_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// What the gateway serves for Tandem's Gateways: the listener sets by
/// address and port, and the targets of their backends.
pub type Served = (FastMap<SocketAddr, Arc<ListenerSet>>, Vec<WorkloadTarget>);

/// The Gateway API objects a gateway serves from, and what they refer to.
#[derive(Debug, Default)]
pub struct Objects {
    /// GatewayClasses.
    pub classes: Vec<super::model::GatewayClass>,
    /// Gateways.
    pub gateways: Vec<super::model::Gateway>,
    /// HTTPRoutes.
    pub routes: Vec<super::model::HttpRoute>,
    /// ReferenceGrants.
    pub grants: Vec<super::model::ReferenceGrant>,
    /// Services.
    pub services: Vec<Service>,
    /// Secrets of type `kubernetes.io/tls`.
    pub secrets: Vec<Secret>,
    /// Namespaces.
    pub namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
    /// EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
}

impl Objects {
    /// Attachment and status ([`super::attach::compute`]) for the classes
    /// with `controller`, Gateways given `addresses`, and what is served.
    pub fn serve(&self, controller: &str, addresses: &[IpAddr]) -> (Outcome, Served) {
        let outcome = super::attach::compute(&super::attach::World {
            controller,
            classes: &self.classes,
            gateways: &self.gateways,
            routes: &self.routes,
            grants: &self.grants,
            services: &self.services,
            secrets: &self.secrets,
            namespaces: &self.namespaces,
            addresses,
        });
        let served = compile(&outcome, &self.services, &self.slices, &self.secrets);
        (outcome, served)
    }
}

/// The listener sets and backend targets for `outcome`.
pub fn compile(
    outcome: &Outcome,
    services: &[Service],
    slices: &[Arc<EndpointSlice>],
    secrets: &[Secret],
) -> Served {
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
            let set = sets
                .entry(SocketAddr::new(address, listener.port))
                .or_default();
            set.push(listener.hostname.clone(), hosts);
            if listener.tls {
                // The first certificate that loads (attachment checked that
                // one does; a Secret changed since waits for the next build).
                let certificate = listener.certificates.iter().find_map(|(namespace, name)| {
                    let secret = secrets.iter().find(|s| {
                        s.metadata.namespace.as_deref() == Some(namespace.as_str())
                            && s.metadata.name.as_deref() == Some(name.as_str())
                    })?;
                    super::tls::load(secret).ok()
                });
                match certificate {
                    Some(certificate) => {
                        set.push_certificate(listener.hostname.clone(), certificate)
                    }
                    // No certificate: the set is still TLS, and a client
                    // that asks for this name fails its handshake.
                    None => set.tls = true,
                }
            }
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
        let filters = compile_filters(&rule.filters);
        let timeout = rule.timeouts.as_ref().and_then(|t| {
            [&t.request, &t.backend_request]
                .into_iter()
                .filter_map(|d| d.as_deref().and_then(parse_duration))
                .filter(|d| !d.is_zero())
                .min()
        });
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
                filters: filters.clone(),
                timeout,
            }));
        }
    }
    compiled
}

/// A Gateway API Duration (`1h30m`, `500ms`: up to four numbers of at
/// most five digits, each with `h`, `m`, `s` or `ms`); none when it is not
/// one.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

/// What a rule's filters do, in one value (none when they do nothing).
/// Several header modifiers of one kind apply in order; the CRD allows at
/// most one of each.
fn compile_filters(filters: &[crate::gatewayapi::model::HttpRouteFilter]) -> Option<Arc<Filters>> {
    use crate::gatewayapi::model::{HeaderModifier, PathModifier};
    let edits = |m: &HeaderModifier| {
        HeaderEdits::new(
            m.set.iter().map(|h| (h.name.as_str(), h.value.as_str())),
            m.add.iter().map(|h| (h.name.as_str(), h.value.as_str())),
            m.remove.iter().map(String::as_str),
        )
    };
    let merge = |into: &mut HeaderEdits, more: HeaderEdits| {
        into.set.extend(more.set);
        into.add.extend(more.add);
        into.remove.extend(more.remove);
    };
    let path = |p: &PathModifier| match p.kind.as_str() {
        "ReplaceFullPath" => p.replace_full_path.clone().map(PathChange::Full),
        "ReplacePrefixMatch" => p.replace_prefix_match.clone().map(PathChange::Prefix),
        _ => None,
    };
    let mut compiled = Filters::default();
    for filter in filters {
        match filter.kind.as_str() {
            "RequestHeaderModifier" => {
                if let Some(m) = &filter.request_header_modifier {
                    merge(&mut compiled.request, edits(m));
                }
            }
            "ResponseHeaderModifier" => {
                if let Some(m) = &filter.response_header_modifier {
                    merge(&mut compiled.response, edits(m));
                }
            }
            "RequestRedirect" => {
                if let Some(r) = &filter.request_redirect {
                    compiled.redirect = Some(Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(path),
                        port: r.port,
                        status: r.status_code.unwrap_or(302),
                    });
                }
            }
            "URLRewrite" => {
                if let Some(r) = &filter.url_rewrite {
                    compiled.rewrite = Some(Rewrite {
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(path),
                    });
                }
            }
            _ => {}
        }
    }
    (!compiled.is_empty()).then(|| Arc::new(compiled))
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
    // A public Service without a selector points at the gateways (a
    // Function, or a workload scaled on concurrency): the request is that
    // workload's, with its cold path and measurements. One with a selector
    // (scaled on CPU) reaches its pods directly, as any Service.
    let points_at_gateways = service
        .and_then(|s| s.spec.as_ref())
        .is_none_or(|spec| spec.selector.as_ref().is_none_or(|s| s.is_empty()));
    if let Some(own) = service
        .filter(|_| points_at_gateways)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_gateway_api_writes_them() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(
            parse_duration("1m1s1ms"),
            Some(Duration::from_millis(61_001))
        );
        for bad in ["", "5", "1d", "123456s", "1s1s1s1s1s", "-1s", "1.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
