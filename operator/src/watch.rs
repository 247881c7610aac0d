//! Kubernetes watch plumbing used by the controller, the autoscaler and the
//! gateway alike (mechanism only: no domain logic lives here).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Lookup, ObjectRef, Store};
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

/// What a cache can hold: an object of a fixed kind that can be read and
/// shared between tasks.
pub trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Runs a reflector in its own task, so the cache keeps up whatever its
/// readers are doing, and hands every watch event to `on_event`. Errors are
/// logged and the watch retries with backoff: one bad event never stops it.
pub fn spawn_cache<K, F, Fut>(api: Api<K>, config: watcher::Config, on_event: F) -> Store<K>
where
    K: Watched,
    F: FnMut(watcher::Event<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .modify(|object: &mut K| crate::api::contract::slim_managed_fields(object.meta_mut()));
    let events = relist_expired_at_once(reflector::reflector(writer, events)).default_backoff();
    spawn_events(events, on_event);
    store
}

/// How often an expired watch (410 Gone) relists at once, without backoff.
const EXPIRED_RELIST_EVERY: Duration = Duration::from_secs(30);

/// Lets a watch that expired (410 Gone: its resourceVersion was compacted
/// away, typically after a connection outage) relist at once rather than
/// after the backoff that the outage's failed attempts had grown (up to
/// 30 s plus jitter, on top of the outage): the 410 is the API server
/// answering, not failing. At most one 410 per [`EXPIRED_RELIST_EVERY`]
/// skips the backoff, so a watch that keeps expiring cannot relist in a
/// tight loop.
pub fn relist_expired_at_once<K, S>(
    events: S,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut last: Option<tokio::time::Instant> = None;
    events.filter_map(move |event| {
        let pass = match &event {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                let now = tokio::time::Instant::now();
                let at_once = last.is_none_or(|at| now.duration_since(at) >= EXPIRED_RELIST_EVERY);
                if at_once {
                    last = Some(now);
                    tracing::info!(reason = %status.message, "watch expired (410 Gone); relisting now");
                }
                !at_once
            }
            _ => true,
        };
        std::future::ready(pass.then_some(event))
    })
}

fn spawn_events<K, S, F, Fut>(events: S, mut on_event: F)
where
    K: kube::Resource<DynamicType = ()> + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    F: FnMut(watcher::Event<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => on_event(event).await,
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "watch error; retrying"),
            }
        }
    });
}

/// An object of a watch that could not be read as its type.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// Namespace, if any.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Its uid (for an Event about it).
    pub uid: Option<String>,
    /// Its resourceVersion.
    pub resource_version: Option<String>,
    /// Why it could not be read.
    pub error: String,
}

/// Told of every unreadable object, once per version of it.
pub type OnUnreadable = Arc<dyn Fn(&Unreadable) + Send + Sync>;

/// The watch events of `K`, read through untyped objects, so that one
/// object that does not deserialize (stored before a schema change, or
/// written by a newer version) is skipped, not the whole list: a typed
/// watch fails the initial list on it, and with it the cache's sync. An
/// unreadable object is logged and handed to `on_unreadable` once per
/// version; the last version that was readable stays in `known` (which
/// this stream must feed) until the object is deleted.
pub fn tolerant_events<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    config: watcher::Config,
    known: Store<K>,
    on_unreadable: OnUnreadable,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Watched,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let reported: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    relist_expired_at_once(watcher(api, config))
        .default_backoff()
        .filter_map(move |event| {
            let converted =
                event.map(|event| convert::<K>(event, &known, &reported, on_unreadable.as_ref()));
            std::future::ready(match converted {
                Ok(Some(event)) => Some(Ok(event)),
                Ok(None) => None,
                Err(error) => Some(Err(error)),
            })
        })
}

fn convert<K>(
    event: watcher::Event<DynamicObject>,
    known: &Store<K>,
    reported: &Mutex<HashSet<(String, String)>>,
    on_unreadable: &(dyn Fn(&Unreadable) + Send + Sync),
) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
{
    let read = |object: &DynamicObject| -> Result<K, Unreadable> {
        serde_json::to_value(object)
            .and_then(serde_json::from_value::<K>)
            .map(|mut read: K| {
                crate::api::contract::slim_managed_fields(read.meta_mut());
                read
            })
            .map_err(|error| Unreadable {
                namespace: object.metadata.namespace.clone(),
                name: object.metadata.name.clone().unwrap_or_default(),
                uid: object.metadata.uid.clone(),
                resource_version: object.metadata.resource_version.clone(),
                error: error.to_string(),
            })
    };
    let report = |unreadable: &Unreadable| {
        let version = (
            unreadable.uid.clone().unwrap_or_default(),
            unreadable.resource_version.clone().unwrap_or_default(),
        );
        let mut reported = reported.lock().expect("reported lock");
        if reported.len() > 10_000 {
            reported.clear();
        }
        if reported.insert(version) {
            tracing::warn!(
                kind = %K::kind(&()),
                namespace = ?unreadable.namespace,
                name = %unreadable.name,
                error = %unreadable.error,
                "skipping an object that cannot be read (its last readable version, if any, stays in use)"
            );
            on_unreadable(unreadable);
        }
    };
    match event {
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
        watcher::Event::InitApply(object) => match read(&object) {
            Ok(object) => Some(watcher::Event::InitApply(object)),
            Err(unreadable) => {
                report(&unreadable);
                // Relisting drops what is not listed: keep the last readable
                // version, as an update would.
                last_known(known, &unreadable).map(watcher::Event::InitApply)
            }
        },
        watcher::Event::Apply(object) => match read(&object) {
            Ok(object) => Some(watcher::Event::Apply(object)),
            Err(unreadable) => {
                report(&unreadable);
                None
            }
        },
        watcher::Event::Delete(object) => match read(&object) {
            Ok(object) => Some(watcher::Event::Delete(object)),
            Err(unreadable) => last_known(known, &unreadable).map(watcher::Event::Delete),
        },
    }
}

fn last_known<K>(known: &Store<K>, unreadable: &Unreadable) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut key = ObjectRef::<K>::new(&unreadable.name);
    if let Some(namespace) = &unreadable.namespace {
        key = key.within(namespace);
    }
    known.get(&key).map(|object| (*object).clone())
}

/// [`spawn_cache`] for a watch that survives unreadable objects
/// ([`tolerant_events`]).
pub fn spawn_tolerant_cache<K, F, Fut>(
    client: &kube::Client,
    namespace: Option<&str>,
    config: watcher::Config,
    on_event: F,
    on_unreadable: OnUnreadable,
) -> Store<K>
where
    K: Watched,
    F: FnMut(watcher::Event<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (store, writer) = reflector::store();
    let events =
        tolerant_events(client, namespace, config, store.clone(), on_unreadable).reflect(writer);
    spawn_events(events, on_event);
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

/// The objects of a reflected watch stream (one that has passed through
/// `reflect`), each once its store holds it: an `Apply` at once, the
/// objects of a (re)list only at its `InitDone`, when the store has swapped
/// in the new list. A controller that reconciled an `InitApply` at once
/// could look its object up before the store had it, find nothing, and drop
/// the request: after a relist (a watch that expired), an object created
/// while the watch was down would then wait for its next change.
pub fn stored_objects<K, S>(events: S) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    events
        .scan(Vec::new(), |listed, event| {
            let out: Vec<Result<K, watcher::Error>> = match event {
                Ok(watcher::Event::Apply(object)) => vec![Ok(object)],
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    Vec::new()
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listed.push(object);
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    std::mem::take(listed).into_iter().map(Ok).collect()
                }
                Ok(watcher::Event::Delete(_)) => Vec::new(),
                Err(error) => vec![Err(error)],
            };
            std::future::ready(Some(futures::stream::iter(out)))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn named(name: &str) -> ConfigMap {
        let mut object = ConfigMap::default();
        object.metadata.name = Some(name.into());
        object.metadata.namespace = Some("ns".into());
        object
    }

    /// Every object handed on is already in the store, also in a relist.
    #[tokio::test]
    async fn listed_objects_are_handed_on_once_the_store_has_them() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(named("a"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(named("b"))),
            // The watch expired: a relist, with "c" created meanwhile.
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(named("a"))),
            Ok(watcher::Event::InitApply(named("c"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(named("a"))),
        ]);
        let mut objects = Box::pin(stored_objects(events.reflect(writer)));
        let mut seen = Vec::new();
        while let Some(object) = objects.next().await {
            let object = object.unwrap();
            let key = ObjectRef::from_obj(&object);
            assert!(store.get(&key).is_some(), "{key} handed on before stored");
            seen.push(object.metadata.name.unwrap());
        }
        assert_eq!(seen, ["a", "b", "a", "c"]);
    }

    fn gone() -> Result<watcher::Event<ConfigMap>, watcher::Error> {
        let mut status = kube::core::Status::failure("too old resource version", "Expired");
        status.code = 410;
        Err(watcher::Error::WatchError(Box::new(status)))
    }

    /// A 410 skips the backoff (it is not passed on) once per 30 s; other
    /// errors and a second 410 within 30 s are passed on, to back off.
    #[tokio::test(start_paused = true)]
    async fn an_expired_watch_relists_at_once_but_not_in_a_loop() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(relist_expired_at_once(rx));
        let passed = |item: Option<Result<watcher::Event<ConfigMap>, watcher::Error>>| match item {
            Some(Ok(_)) => "event",
            Some(Err(watcher::Error::WatchError(_))) => "410",
            Some(Err(_)) => "other error",
            None => "end",
        };
        tx.unbounded_send(gone()).unwrap();
        tx.unbounded_send(Ok(watcher::Event::Init)).unwrap();
        assert_eq!(
            passed(out.next().await),
            "event",
            "the first 410 is dropped"
        );
        tx.unbounded_send(gone()).unwrap();
        assert_eq!(
            passed(out.next().await),
            "410",
            "a second one within 30 s backs off"
        );
        tx.unbounded_send(Err(watcher::Error::NoResourceVersion))
            .unwrap();
        assert_eq!(passed(out.next().await), "other error");
        tokio::time::advance(Duration::from_secs(29)).await;
        tx.unbounded_send(gone()).unwrap();
        assert_eq!(passed(out.next().await), "410");
        tokio::time::advance(Duration::from_secs(1)).await;
        tx.unbounded_send(gone()).unwrap();
        tx.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
        assert_eq!(
            passed(out.next().await),
            "event",
            "30 s on, a 410 relists at once again"
        );
        drop(tx);
        assert_eq!(passed(out.next().await), "end");
    }
}
