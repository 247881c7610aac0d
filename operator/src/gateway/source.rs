//! Where the routing table comes from: the Kubernetes API (HybridApps and
//! the EndpointSlices of Tandem's Services), or a static file (tests,
//! benchmarks, running without a cluster).
//!
//! Either source publishes whole tables on a `watch` channel: readers see
//! the old table or the new one, never a mix. If the API server goes away the
//! watchers retry with backoff and the last table keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde::Deserialize;
use tokio::sync::{Notify, watch};

use super::table::{
    FastMap, ListenerSet, RoutingTable, ServiceAccess, WorkloadKey, WorkloadTarget,
};
use crate::api::{HybridApp, labels};
use crate::gatewayapi::model::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};

/// Ready endpoints of one workload, as written in a static config.
#[derive(Debug, Clone, Deserialize)]
pub struct StaticEndpoints {
    /// Namespace of the app.
    pub namespace: String,
    /// App name.
    pub app: String,
    /// Workload name.
    pub workload: String,
    /// `ip:port` of each ready endpoint.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
}

/// A static configuration file: apps and their endpoints, and Gateway API
/// objects served as they would be from the API server.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StaticConfig {
    /// HybridApps (with `metadata.namespace`).
    #[serde(default)]
    pub apps: Vec<HybridApp>,
    /// Ready endpoints per workload.
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoints>,
    /// Gateway API objects to serve (no status is written).
    #[serde(default, rename = "gatewayApi")]
    pub gateway_api: Option<StaticGatewayApi>,
}

/// The Gateway API part of a static config.
#[derive(Debug, Clone, Deserialize)]
pub struct StaticGatewayApi {
    /// The `controllerName` of the classes served.
    #[serde(rename = "controllerName")]
    pub controller_name: String,
    /// Addresses given to Gateways (as `--gateway-addresses`).
    pub addresses: String,
    /// GatewayClasses, Gateways, HTTPRoutes, ReferenceGrants, Services,
    /// EndpointSlices, Secrets and Namespaces, each with its `kind`.
    pub objects: Vec<serde_json::Value>,
}

impl StaticGatewayApi {
    /// The listener sets and backend targets these objects come to.
    fn compile(&self) -> Result<crate::gatewayapi::serve::Served, String> {
        let pool = crate::gatewayapi::parse_addresses(&self.addresses)?;
        let mut objects = crate::gatewayapi::serve::Objects::default();
        fn read<T: serde::de::DeserializeOwned>(object: &serde_json::Value) -> Result<T, String> {
            serde_json::from_value(object.clone())
                .map_err(|e| format!("{} {}: {e}", object["kind"], object["metadata"]["name"]))
        }
        for object in &self.objects {
            match object["kind"].as_str().unwrap_or_default() {
                "GatewayClass" => objects.classes.push(read(object)?),
                "Gateway" => objects.gateways.push(read(object)?),
                "HTTPRoute" => objects.routes.push(read(object)?),
                "ReferenceGrant" => objects.grants.push(read(object)?),
                "Service" => objects.services.push(read(object)?),
                "EndpointSlice" => objects.slices.push(Arc::new(read(object)?)),
                "Secret" => objects.secrets.push(read(object)?),
                "Namespace" => objects.namespaces.push(read(object)?),
                other => return Err(format!("gatewayApi.objects: kind {other:?} is not served")),
            }
        }
        Ok(objects.serve(&self.controller_name, &pool.0).1)
    }
}

impl StaticConfig {
    /// Builds the table this file describes.
    pub fn table(&self) -> Result<RoutingTable, String> {
        let endpoints: HashMap<WorkloadKey, Vec<SocketAddr>> = self
            .endpoints
            .iter()
            .map(|e| {
                (
                    WorkloadKey {
                        namespace: e.namespace.clone(),
                        app: e.app.clone(),
                        workload: e.workload.clone(),
                    },
                    e.addresses.clone(),
                )
            })
            .collect();
        let table = RoutingTable::build(&self.apps, &endpoints);
        Ok(match &self.gateway_api {
            Some(gateway_api) => {
                let (listeners, targets) = gateway_api.compile()?;
                table.with_listeners(listeners, targets)
            }
            None => table,
        })
    }
}

/// Reloads `path` whenever it changes (checked every 100 ms) and publishes
/// the table. A file that does not parse is logged and the previous table
/// stays. Calls `on_loaded` after the first successful load.
pub async fn run_static(
    path: PathBuf,
    tables: watch::Sender<Arc<RoutingTable>>,
    on_loaded: impl FnOnce() + Send,
) {
    let mut on_loaded = Some(on_loaded);
    let mut last_seen = None;
    loop {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != last_seen {
            last_seen = modified;
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    let config =
                        serde_yaml::from_str::<StaticConfig>(&text).map_err(|e| e.to_string())?;
                    Ok((config.table()?, config))
                }) {
                Ok((table, config)) => {
                    tables.send_replace(Arc::new(table));
                    tracing::info!(file = %path.display(), apps = config.apps.len(), "routing table loaded");
                    if let Some(done) = on_loaded.take() {
                        done();
                    }
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "static config not loaded; keeping the previous table")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serving Gateways of Tandem's GatewayClasses.
#[derive(Debug, Clone)]
pub struct GatewayApiConfig {
    /// The `controllerName` of Tandem's classes.
    pub controller: String,
    /// The addresses Gateways are given, in order.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The caches of the Gateway API objects and what they refer to.
#[derive(Clone)]
pub struct GatewayApiStores {
    /// GatewayClasses.
    pub classes: Store<GatewayClass>,
    /// Gateways.
    pub gateways: Store<Gateway>,
    /// HTTPRoutes.
    pub routes: Store<HttpRoute>,
    /// ReferenceGrants.
    pub grants: Store<ReferenceGrant>,
    /// Services.
    pub services: Store<Service>,
    /// Every EndpointSlice.
    pub slices: Store<EndpointSlice>,
    /// TLS Secrets.
    pub secrets: Store<Secret>,
    /// Namespaces.
    pub namespaces: Store<Namespace>,
}

impl GatewayApiStores {
    fn spawn(client: &kube::Client, changed: Arc<Notify>) -> Self {
        fn cluster<K>(client: &kube::Client, changed: Arc<Notify>) -> Store<K>
        where
            K: crate::watch::Watched<Scope = k8s_openapi::ClusterResourceScope>,
        {
            crate::watch::spawn_cache(
                Api::<K>::all(client.clone()),
                watcher::Config::default(),
                move |_| {
                    changed.notify_one();
                    std::future::ready(())
                },
            )
        }
        let config = watcher::Config::default;
        Self {
            classes: cluster(client, changed.clone()),
            namespaces: cluster(client, changed.clone()),
            gateways: spawn_cache(client, None, config(), changed.clone()),
            routes: spawn_cache(client, None, config(), changed.clone()),
            grants: spawn_cache(client, None, config(), changed.clone()),
            services: spawn_cache(client, None, config(), changed.clone()),
            slices: spawn_cache(client, None, config(), changed.clone()),
            secrets: spawn_cache(
                client,
                None,
                config().fields("type=kubernetes.io/tls"),
                changed,
            ),
        }
    }

    async fn listed(&self) -> bool {
        crate::watch::listed(&self.classes).await
            && crate::watch::listed(&self.namespaces).await
            && crate::watch::listed(&self.gateways).await
            && crate::watch::listed(&self.routes).await
            && crate::watch::listed(&self.grants).await
            && crate::watch::listed(&self.services).await
            && crate::watch::listed(&self.slices).await
            && crate::watch::listed(&self.secrets).await
    }
}

/// What the Gateway API objects came to at one moment: for the status
/// writer.
pub struct GatewayApiView {
    /// The objects.
    pub stores: GatewayApiStores,
    /// What was computed from them.
    pub outcome: crate::gatewayapi::attach::Outcome,
}

fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Clone + kube::runtime::reflector::Lookup + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// Computes attachment and status from the Gateway API caches, and the
/// listeners and backend targets they add to the routing table.
fn gateway_api_view(
    config: &GatewayApiConfig,
    stores: &GatewayApiStores,
) -> (
    GatewayApiView,
    FastMap<std::net::SocketAddr, Arc<ListenerSet>>,
    Vec<WorkloadTarget>,
) {
    let objects = crate::gatewayapi::serve::Objects {
        classes: owned(&stores.classes),
        gateways: owned(&stores.gateways),
        routes: owned(&stores.routes),
        grants: owned(&stores.grants),
        services: owned(&stores.services),
        secrets: owned(&stores.secrets),
        namespaces: owned(&stores.namespaces),
        slices: stores.slices.state(),
    };
    let (outcome, (listeners, targets)) = objects.serve(&config.controller, &config.addresses);
    (
        GatewayApiView {
            stores: stores.clone(),
            outcome,
        },
        listeners,
        targets,
    )
}

/// Watches HybridApps and EndpointSlices (in `namespaces`, or all when
/// empty) and publishes a new table after every change. Calls `on_synced`
/// once both have been listed. With `gateway_api`, it also watches the
/// Gateway API objects, adds Tandem's Gateways to the table and publishes
/// what they came to on `views`.
pub async fn run_kubernetes(
    client: kube::Client,
    namespaces: Vec<String>,
    cluster_domain: String,
    tables: watch::Sender<Arc<RoutingTable>>,
    on_synced: impl FnOnce() + Send,
    gateway_api: Option<(GatewayApiConfig, watch::Sender<Option<Arc<GatewayApiView>>>)>,
) {
    let changed = Arc::new(Notify::new());
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut app_stores = Vec::new();
    let mut slice_stores = Vec::new();
    for scope in scopes {
        // An app that cannot be read is skipped (its last readable version
        // keeps serving), never the whole watch.
        let notify = changed.clone();
        app_stores.push(crate::watch::spawn_tolerant_cache::<HybridApp, _, _>(
            &client,
            scope.as_deref(),
            watcher::Config::default(),
            move |_| {
                notify.notify_one();
                std::future::ready(())
            },
            Arc::new(|_| {}),
        ));
        let managed = watcher::Config::default().labels(&labels::managed_selector());
        slice_stores.push(spawn_cache::<EndpointSlice>(
            &client,
            scope.as_deref(),
            managed,
            changed.clone(),
        ));
    }
    let gateway_stores = gateway_api
        .as_ref()
        .map(|_| GatewayApiStores::spawn(&client, changed.clone()));
    // Wait until every cache has listed (polling: see the controller).
    loop {
        let mut all = true;
        if let Some(stores) = &gateway_stores {
            all &= stores.listed().await;
        }
        for store in &app_stores {
            all &= crate::watch::listed(store).await;
        }
        for store in &slice_stores {
            all &= crate::watch::listed(store).await;
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut on_synced = Some(on_synced);
    loop {
        let apps: Vec<HybridApp> = app_stores
            .iter()
            .flat_map(|s| s.state())
            .map(|a| (*a).clone())
            .collect();
        let slices: Vec<Arc<EndpointSlice>> = slice_stores.iter().flat_map(|s| s.state()).collect();
        let access = ServiceAccess {
            cluster_domain: cluster_domain.clone(),
            ports: gateway_ports(&slices),
        };
        let mut table = RoutingTable::build_with(&apps, &ready_endpoints(&slices), &access);
        if let (Some((config, views)), Some(stores)) = (&gateway_api, &gateway_stores) {
            let (view, listeners, targets) = gateway_api_view(config, stores);
            table = table.with_listeners(listeners, targets);
            views.send_replace(Some(Arc::new(view)));
        }
        tables.send_replace(Arc::new(table));
        if let Some(done) = on_synced.take() {
            tracing::info!(apps = apps.len(), "watches synced; routing table built");
            done();
        }
        // Events that arrive while building coalesce into one more rebuild.
        changed.notified().await;
    }
}

fn spawn_cache<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> Store<K>
where
    K: crate::watch::Watched + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let api: Api<K> = crate::watch::scoped(client, namespace);
    // Any event, a re-list included, may change the table.
    crate::watch::spawn_cache(api, config, move |_| {
        changed.notify_one();
        std::future::ready(())
    })
}

/// The workload a slice labelled by Tandem belongs to, its [`labels::SERVICE`]
/// kind, and its `http` port.
fn slice_of(slice: &EndpointSlice) -> Option<(WorkloadKey, &str, u16)> {
    let labels = slice.metadata.labels.as_ref()?;
    let key = WorkloadKey {
        namespace: slice.metadata.namespace.clone()?,
        app: labels.get(labels::APP)?.clone(),
        workload: labels.get(labels::WORKLOAD)?.clone(),
    };
    let kind = labels.get(labels::SERVICE)?;
    let port = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())?;
    Some((key, kind, port))
}

/// The gateway port of each workload, from the slices Tandem writes for
/// public Services that point at the gateways.
pub fn gateway_ports(slices: &[Arc<EndpointSlice>]) -> HashMap<WorkloadKey, u16> {
    slices
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::SLICE_MANAGED_BY))
                .is_some_and(|m| m == labels::SLICE_MANAGER)
        })
        .filter_map(|s| slice_of(s))
        .filter(|(_, kind, _)| *kind == labels::PUBLIC)
        .map(|(key, _, port)| (key, port))
        .collect()
}

/// Ready endpoints per workload from the EndpointSlices of Tandem's
/// private Services (those that select the pods).
pub fn ready_endpoints(slices: &[Arc<EndpointSlice>]) -> HashMap<WorkloadKey, Vec<SocketAddr>> {
    let mut endpoints: HashMap<WorkloadKey, Vec<SocketAddr>> = HashMap::new();
    for slice in slices {
        let Some((key, kind, port)) = slice_of(slice) else {
            continue;
        };
        if kind != labels::PRIVATE {
            continue;
        }
        let entry = endpoints.entry(key).or_default();
        for endpoint in slice.endpoints.iter().flatten() {
            // Unknown readiness counts as ready, as the API documents.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let terminating = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<std::net::IpAddr>() {
                    entry.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A static config's Gateway API objects are served as they would be
    /// from the API server; a kind it does not serve is refused by name.
    #[test]
    fn a_static_config_serves_gateway_api_objects() {
        let yaml = r#"
gatewayApi:
  controllerName: tandem.dev/gateway
  addresses: 127.0.13.1
  objects:
    - {kind: GatewayClass, metadata: {name: tandem}, spec: {controllerName: tandem.dev/gateway}}
    - kind: Gateway
      metadata: {name: edge, namespace: web}
      spec: {gatewayClassName: tandem, listeners: [{name: http, port: 8000, protocol: HTTP}]}
    - kind: HTTPRoute
      metadata: {name: all, namespace: web}
      spec: {parentRefs: [{name: edge}], rules: [{backendRefs: [{name: echo, port: 80}]}]}
    - kind: Service
      metadata: {name: echo, namespace: web}
      spec: {ports: [{name: http, port: 80, targetPort: 9000}]}
    - kind: EndpointSlice
      metadata: {name: echo-1, namespace: web, labels: {kubernetes.io/service-name: echo}}
      addressType: IPv4
      ports: [{name: http, port: 9000}]
      endpoints: [{addresses: [127.0.0.1], conditions: {ready: true}}]
"#;
        let config: StaticConfig = serde_yaml::from_str(yaml).unwrap();
        let table = config.table().unwrap();
        let at: SocketAddr = "127.0.13.1:8000".parse().unwrap();
        assert_eq!(table.listener_addresses(), [at]);
        assert!(!table.listener_tls(at));
        let route = table
            .listener_route(
                at,
                Some("any.example"),
                "/x",
                "GET",
                &http::HeaderMap::new(),
            )
            .expect("the route");
        let (key, _) = &route.backends[0];
        let target = table.workload(key).expect("the Service's target");
        assert_eq!(target.endpoints, ["127.0.0.1:9000".parse().unwrap()]);

        let odd = yaml.replace("kind: Service\n", "kind: Pod\n");
        let config: StaticConfig = serde_yaml::from_str(&odd).unwrap();
        let error = config.table().unwrap_err();
        assert!(error.contains("\"Pod\" is not served"), "{error}");
    }
}
