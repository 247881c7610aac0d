//! Kubernetes watch plumbing used by the controller, the autoscaler and the
//! gateway alike (mechanism only: no domain logic lives here).

use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Lookup, Store};
use kube::runtime::{WatchStreamExt, watcher};

/// An API for one namespace, or for all when `namespace` is `None`.
pub fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs a reflector in its own task, so the cache keeps up whatever its
/// readers are doing, and hands every watch event to `on_event`. Errors are
/// logged and the watch retries with backoff: one bad event never stops it.
pub fn spawn_cache<K, F, Fut>(api: Api<K>, config: watcher::Config, mut on_event: F) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(watcher::Event<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (store, writer) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => on_event(event).await,
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "watch error; retrying"),
            }
        }
    });
    store
}

/// Whether `store` has listed its objects. Polled rather than awaited: a
/// store's readiness signal does not reliably wake more than one waiter, and
/// kube's controller runner already waits on its own store.
pub async fn listed<K>(store: &Store<K>) -> bool
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(
        tokio::time::timeout(Duration::ZERO, store.wait_until_ready()).await,
        Ok(Ok(()))
    )
}
