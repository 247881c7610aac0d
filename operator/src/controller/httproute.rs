//! The Gateway API `HTTPRoute` of a HybridApp with `spec.gateway`, built as
//! a pure function of the app (and its effective weights in status).
//!
//! `spec.rules` and `backendRefs` are atomic lists in Gateway API, so no two
//! field managers can share them: Tandem owns the whole route (server-side
//! apply, forced), and never touches an HTTPRoute it did not create (its
//! own carry Tandem's labels and the app as controlling owner).
//!
//! Only Standard-channel fields: per route a rule named like it, with a
//! match per method (Gateway API matches one method each; the matches of a
//! rule are alternatives), the path (`Exact` or `PathPrefix`), exact header
//! matches, and a `backendRef` per backend to the workload's public Service
//! on port 80 with its effective weight (weight 0 stays listed, as Gateway
//! API allows). Requests reach AlwaysOn workloads scaled on CPU directly
//! (their Service selects their pods) and the others through the Tandem
//! gateways (their Service points there): see [`super::children`].

use serde_json::{Value, json};

use crate::api::contract::child_name;
use crate::api::{HybridApp, labels};
use crate::gateway::table::method_name;

/// API version and kind of the route.
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// Kind.
pub const KIND: &str = "HTTPRoute";

/// The HTTPRoute `app` asks for, if it has `spec.gateway`.
pub fn build(app: &HybridApp) -> Option<Value> {
    let output = app.spec.gateway.as_ref()?;
    let name = app.metadata.name.clone().unwrap_or_default();
    let rules: Vec<Value> = app
        .spec
        .routes
        .iter()
        .map(|route| {
            let path = match (&route.matches.path, &route.matches.path_prefix) {
                (Some(exact), _) => json!({"type": "Exact", "value": exact}),
                (None, Some(prefix)) => json!({"type": "PathPrefix", "value": prefix}),
                (None, None) => json!({"type": "PathPrefix", "value": "/"}),
            };
            let headers: Vec<Value> = route
                .matches
                .headers
                .iter()
                .map(|h| json!({"type": "Exact", "name": h.name, "value": h.value}))
                .collect();
            let one = |method: Option<&str>| {
                let mut m = json!({"path": path});
                if !headers.is_empty() {
                    m["headers"] = json!(headers);
                }
                if let Some(method) = method {
                    m["method"] = json!(method);
                }
                m
            };
            let matches: Vec<Value> = if route.matches.methods.is_empty() {
                vec![one(None)]
            } else {
                route
                    .matches
                    .methods
                    .iter()
                    .map(|m| one(Some(method_name(*m))))
                    .collect()
            };
            let backend_refs: Vec<Value> = crate::migration::gateway_weights(app, route)
                .into_iter()
                .map(|(workload, weight)| {
                    json!({
                        "group": "", "kind": "Service",
                        "name": child_name(&name, &workload), "port": 80, "weight": weight,
                    })
                })
                .collect();
            json!({"name": route.name, "matches": matches, "backendRefs": backend_refs})
        })
        .collect();
    let mut spec = json!({
        "parentRefs": serde_json::to_value(&output.parent_refs).unwrap_or_default(),
        "rules": rules,
    });
    if !app.spec.hosts.is_empty() {
        spec["hostnames"] = json!(app.spec.hosts);
    }
    Some(json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": app.metadata.namespace,
            "labels": {labels::MANAGED_BY: labels::MANAGER, labels::APP: name},
            "ownerReferences": [{
                "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
                "name": name, "uid": app.metadata.uid,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
    }))
}

/// An HTTPRoute as Tandem reads it: its metadata, and its spec and status
/// as JSON (Tandem writes whole routes and reads only their parents'
/// conditions, so no typed model of the rest).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HttpRoute {
    /// Metadata.
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// The route's spec.
    #[serde(default)]
    pub spec: Value,
    /// Its status, written by the Gateways' implementations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

impl kube::Resource for HttpRoute {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn api_version(_: &()) -> std::borrow::Cow<'_, str> {
        API_VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "httproutes".into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

/// Whether every parent of `output` accepted `route` at its current
/// generation with all references resolved (as its status says), and why
/// not.
pub fn accepted(
    route: Option<&HttpRoute>,
    parents: &[crate::api::ParentRef],
    namespace: &str,
) -> Result<String, String> {
    let Some(route) = route else {
        return Err("the HTTPRoute is not there yet".into());
    };
    let generation = route.metadata.generation.unwrap_or_default();
    let reported = route
        .status
        .as_ref()
        .and_then(|s| s["parents"].as_array().cloned())
        .unwrap_or_default();
    for parent in parents {
        let parent_ns = parent.namespace.as_deref().unwrap_or(namespace);
        let label = format!("{parent_ns}/{}", parent.name);
        let entry = reported.iter().find(|p| {
            let reference = &p["parentRef"];
            reference["name"] == parent.name.as_str()
                && reference["namespace"].as_str().unwrap_or(namespace) == parent_ns
                && parent
                    .section_name
                    .as_deref()
                    .is_none_or(|s| reference["sectionName"] == s)
        });
        let Some(entry) = entry else {
            return Err(format!("Gateway {label} has not reported on the HTTPRoute"));
        };
        for kind in ["Accepted", "ResolvedRefs"] {
            let condition = entry["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == kind);
            let Some(condition) = condition else {
                return Err(format!("Gateway {label}: no {kind} condition yet"));
            };
            if condition["observedGeneration"].as_i64().unwrap_or_default() < generation {
                return Err(format!(
                    "Gateway {label} has not seen generation {generation} of the HTTPRoute"
                ));
            }
            if condition["status"] != "True" {
                return Err(format!(
                    "Gateway {label}: {kind} is {} ({}): {}",
                    condition["status"].as_str().unwrap_or("?"),
                    condition["reason"].as_str().unwrap_or("?"),
                    condition["message"].as_str().unwrap_or("")
                ));
            }
        }
    }
    Ok(format!(
        "HTTPRoute {} accepted by {} Gateway(s)",
        route.metadata.name.as_deref().unwrap_or_default(),
        parents.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_only_when_every_parent_accepted_the_current_generation() {
        let parents: Vec<crate::api::ParentRef> =
            serde_json::from_value(json!([{"name": "edge", "namespace": "infra"}])).unwrap();
        let route = |status: Value| -> HttpRoute {
            serde_json::from_value(json!({"metadata": {"name": "shop", "generation": 2}, "spec": {}, "status": status})).unwrap()
        };
        let parent = |accepted: &str, generation: i64| {
            json!({"parents": [{"parentRef": {"name": "edge", "namespace": "infra"}, "controllerName": "x/y",
                "conditions": [
                    {"type": "Accepted", "status": accepted, "reason": "NotAllowedByListeners", "message": "no", "observedGeneration": generation},
                    {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "", "observedGeneration": generation}]}]})
        };
        assert!(accepted(None, &parents, "shop").is_err());
        let silent = accepted(Some(&route(json!({}))), &parents, "shop").unwrap_err();
        assert!(silent.contains("infra/edge has not reported"), "{silent}");
        let refused = accepted(Some(&route(parent("False", 2))), &parents, "shop").unwrap_err();
        assert!(
            refused.contains("Accepted is False (NotAllowedByListeners)"),
            "{refused}"
        );
        let stale = accepted(Some(&route(parent("True", 1))), &parents, "shop").unwrap_err();
        assert!(stale.contains("generation 2"), "{stale}");
        let ok = accepted(Some(&route(parent("True", 2))), &parents, "shop").unwrap();
        assert_eq!(ok, "HTTPRoute shop accepted by 1 Gateway(s)");
    }

    #[test]
    fn a_rule_per_route_with_a_match_per_method_and_the_effective_weights() {
        let mut app: HybridApp = serde_yaml::from_str(
            r#"
apiVersion: tandem.dev/v1alpha1
kind: HybridApp
metadata: {name: shop, namespace: store, uid: u-1}
spec:
  hosts: [shop.example.com]
  gateway:
    parentRefs: [{name: edge, namespace: infra, sectionName: http}]
  workloads:
    - {name: web, mode: AlwaysOn, port: 8080, template: {spec: {containers: [{name: c, image: i}]}}}
    - {name: fn, mode: Function, port: 8080, template: {spec: {containers: [{name: c, image: i}]}}}
  routes:
    - name: search
      match: {pathPrefix: /search, methods: [GET, HEAD], headers: [{name: X-Beta, value: "on"}]}
      backends: [{workload: web, weight: 80}, {workload: fn, weight: 20}]
    - name: login
      match: {path: /login}
      backends: [{workload: web}, {workload: fn, weight: 0}]
"#,
        )
        .unwrap();
        let route = build(&app).expect("an HTTPRoute");
        assert_eq!(route["metadata"]["name"], "shop");
        assert_eq!(route["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            route["spec"]["parentRefs"],
            json!([{"name": "edge", "namespace": "infra", "sectionName": "http"}])
        );
        assert_eq!(route["spec"]["hostnames"], json!(["shop.example.com"]));
        let search = &route["spec"]["rules"][0];
        assert_eq!(search["name"], "search");
        assert_eq!(
            search["matches"],
            json!([
                {"path": {"type": "PathPrefix", "value": "/search"}, "method": "GET",
                 "headers": [{"type": "Exact", "name": "X-Beta", "value": "on"}]},
                {"path": {"type": "PathPrefix", "value": "/search"}, "method": "HEAD",
                 "headers": [{"type": "Exact", "name": "X-Beta", "value": "on"}]}
            ])
        );
        let weights: Vec<(String, i64)> = search["backendRefs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["weight"].as_i64().unwrap(),
                )
            })
            .collect();
        let total: i64 = weights.iter().map(|w| w.1).sum();
        assert_eq!(weights[0].0, "shop-web");
        assert_eq!(
            (weights[0].1 * 100 / total, weights[1].1 * 100 / total),
            (80, 20)
        );
        let login = &route["spec"]["rules"][1];
        assert_eq!(
            login["matches"],
            json!([{"path": {"type": "Exact", "value": "/login"}}])
        );
        assert_eq!(
            login["backendRefs"][1]["weight"], 0,
            "weight 0 stays listed"
        );

        app.spec.gateway = None;
        assert!(build(&app).is_none());
    }
}
