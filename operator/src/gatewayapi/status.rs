//! Writes the status of Tandem's GatewayClasses, Gateways and the parents
//! of HTTPRoutes, as [`super::attach`] computed it. Several gateway
//! replicas serve; only the one holding the status Lease writes, and it
//! writes an object only when its status differs from what is there
//! (`lastTransitionTime` kept while a condition's status stays the same).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::attach::{Condition, GatewayStatus, RouteParentStatus};
use super::model::{GROUP, Gateway, GatewayClass, HttpRoute};
use crate::gateway::source::GatewayApiView;
use crate::leader::{self, Fence, LeaseConfig};

/// How often the writer checks every status even without a change (a
/// write lost to a conflict, or an edit by someone else, is put right).
pub const RESYNC: Duration = Duration::from_secs(10);

/// Conditions as JSON, keeping each one's previous transition time while
/// its status is unchanged.
pub fn conditions_json(conditions: &[Condition], previous: Option<&Value>, now: &str) -> Value {
    let previous = previous.and_then(Value::as_array);
    Value::Array(
        conditions
            .iter()
            .map(|c| {
                let kept = previous
                    .into_iter()
                    .flatten()
                    .find(|p| {
                        p["type"] == c.kind
                            && p["status"] == if c.status { "True" } else { "False" }
                    })
                    .and_then(|p| p["lastTransitionTime"].as_str());
                c.to_json(kept.unwrap_or(now))
            })
            .collect(),
    )
}

/// A Gateway's status as JSON.
pub fn gateway_json(status: &GatewayStatus, previous: Option<&Value>, now: &str) -> Value {
    let previous = previous.cloned().unwrap_or(Value::Null);
    let listeners: Vec<Value> = status
        .listeners
        .iter()
        .map(|l| {
            let before = previous["listeners"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == l.name.as_str());
            json!({
                "name": l.name,
                "supportedKinds": l.supported_kinds.iter().map(|k| json!({"group": GROUP, "kind": k})).collect::<Vec<_>>(),
                "attachedRoutes": l.attached_routes,
                "conditions": conditions_json(&l.conditions, before.map(|b| &b["conditions"]), now),
            })
        })
        .collect();
    let addresses: Vec<Value> = status
        .address
        .iter()
        .map(|ip| json!({"type": "IPAddress", "value": ip.to_string()}))
        .collect();
    json!({
        "addresses": addresses,
        "conditions": conditions_json(&status.conditions, previous.get("conditions"), now),
        "listeners": listeners,
    })
}

/// A route's `parents`: those of other implementations as they are, then
/// Tandem's.
pub fn route_parents_json(
    controller: &str,
    ours: &[RouteParentStatus],
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let previous: Vec<Value> = previous
        .and_then(|s| s["parents"].as_array().cloned())
        .unwrap_or_default();
    let mut parents: Vec<Value> = previous
        .iter()
        .filter(|p| p["controllerName"] != controller)
        .cloned()
        .collect();
    for parent in ours {
        let reference = serde_json::to_value(&parent.parent).unwrap_or_default();
        let before = previous
            .iter()
            .find(|p| p["controllerName"] == controller && p["parentRef"] == reference);
        parents.push(json!({
            "parentRef": reference,
            "controllerName": controller,
            "conditions": conditions_json(&parent.conditions, before.map(|b| &b["conditions"]), now),
        }));
    }
    Value::Array(parents)
}

/// Holds the status Lease and writes while holding it; waits for it again
/// when it is lost.
pub async fn run(
    client: kube::Client,
    lease: LeaseConfig,
    controller: String,
    mut views: watch::Receiver<Option<Arc<GatewayApiView>>>,
) {
    loop {
        let mut held = leader::acquire(client.clone(), lease.clone(), Fence::new()).await;
        tracing::info!(lease = %lease.name, "writing Gateway API status");
        loop {
            let view = views.borrow_and_update().clone();
            if let Some(view) = view {
                write_all(&client, &controller, &view).await;
            }
            tokio::select! {
                _ = held.lost() => break,
                changed = views.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
        tracing::warn!(lease = %lease.name, "lost the status Lease; waiting for it again");
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

async fn write_all(client: &kube::Client, controller: &str, view: &GatewayApiView) {
    let now = now();
    let params = PatchParams::default();
    let classes: Api<GatewayClass> = Api::all(client.clone());
    for (name, conditions) in &view.outcome.classes {
        let current = view
            .stores
            .classes
            .state()
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(name));
        let previous = current.as_ref().and_then(|c| c.status.clone());
        let desired = json!({
            "conditions": conditions_json(conditions, previous.as_ref().and_then(|p| p.get("conditions")), &now),
            "supportedFeatures": super::SUPPORTED_FEATURES.iter().map(|f| json!({"name": f})).collect::<Vec<_>>(),
        });
        if !same(previous.as_ref(), &desired) {
            report(
                "GatewayClass",
                name,
                classes
                    .patch_status(name, &params, &Patch::Merge(json!({"status": desired})))
                    .await,
            );
        }
    }
    for status in &view.outcome.gateway_status {
        let (namespace, name) = &status.key;
        let current = view.stores.gateways.state().into_iter().find(|g| {
            g.metadata.namespace.as_deref() == Some(namespace)
                && g.metadata.name.as_deref() == Some(name)
        });
        let previous = current.as_ref().and_then(|g| g.status.clone());
        let desired = gateway_json(status, previous.as_ref(), &now);
        if !same(previous.as_ref(), &desired) {
            let api: Api<Gateway> = Api::namespaced(client.clone(), namespace);
            report(
                "Gateway",
                name,
                api.patch_status(name, &params, &Patch::Merge(json!({"status": desired})))
                    .await,
            );
        }
    }
    for route in view.stores.routes.state() {
        let (Some(namespace), Some(name)) = (&route.metadata.namespace, &route.metadata.name)
        else {
            continue;
        };
        let ours: &[RouteParentStatus] = view
            .outcome
            .route_status
            .iter()
            .find(|(k, _)| &k.0 == namespace && &k.1 == name)
            .map(|(_, p)| p.as_slice())
            .unwrap_or_default();
        let had_ours = route
            .status
            .as_ref()
            .and_then(|s| s["parents"].as_array())
            .is_some_and(|p| p.iter().any(|p| p["controllerName"] == controller));
        if ours.is_empty() && !had_ours {
            continue;
        }
        let parents = route_parents_json(controller, ours, route.status.as_ref(), &now);
        let desired = json!({"parents": parents});
        let before = route
            .status
            .as_ref()
            .map(|s| json!({"parents": s["parents"].clone()}));
        if !same(before.as_ref(), &desired) {
            let api: Api<HttpRoute> = Api::namespaced(client.clone(), namespace);
            // The whole list, guarded by the version read: another
            // implementation's parents are never overwritten with stale ones.
            let body = json!({
                "metadata": {"resourceVersion": route.metadata.resource_version},
                "status": desired,
            });
            report(
                "HTTPRoute",
                name,
                api.patch_status(name, &params, &Patch::Merge(body)).await,
            );
        }
    }
}

fn same(previous: Option<&Value>, desired: &Value) -> bool {
    let Some(previous) = previous else {
        return false;
    };
    desired
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| previous.get(k) == Some(v))
}

fn report<T>(kind: &str, name: &str, result: kube::Result<T>) {
    match result {
        Ok(_) => tracing::debug!(kind, name, "status written"),
        Err(error) => {
            tracing::warn!(kind, name, %error, "status not written; retried at the next change or resync")
        }
    }
}
