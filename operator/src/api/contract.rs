//! What the reconciler and the autoscaler both rely on, kept with the API
//! types so that neither imports the other: who writes which fields (field
//! managers), what the children are called, the condition types, and the one
//! function that writes `spec.replicas`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ObjectMeta};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Field manager of every reconciler write (children, status).
pub const MANAGER: &str = "tandem";
/// Field manager that owns `spec.replicas` of the Deployments Tandem
/// scales, and the `Autoscaled` condition.
pub const AUTOSCALER_MANAGER: &str = "tandem-autoscaler";
/// Field manager of the costs in status (written at their own pace, so the
/// autoscaler's applies and these never take each other's fields away).
pub const COSTS_MANAGER: &str = "tandem-costs";

/// Name of the Deployment and Service of `workload` in `app`.
pub fn child_name(app: &str, workload: &str) -> String {
    format!("{app}-{workload}")
}

/// Name of the headless Service that selects the pods of `workload` in
/// `app` (the gateways read its EndpointSlices): `<app>-<workload>-private`,
/// or, where that is longer than a DNS label, the first part of the child
/// name cut short and a fingerprint of the whole.
pub fn private_name(app: &str, workload: &str) -> String {
    const SUFFIX: &str = "-private";
    let child = child_name(app, workload);
    if child.len() + SUFFIX.len() <= 63 {
        return format!("{child}{SUFFIX}");
    }
    let hash = child.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    }) as u32;
    // 46 + 1 + 8 + 8 = 63; the name is ASCII, so any cut is a char boundary.
    format!("{}-{hash:08x}{SUFFIX}", &child[..46])
}

/// Reduces an object's managed fields to what Tandem reads of them: the
/// Apply entries of [`MANAGER`], each cut down to whether it owns
/// `spec.replicas` (the reconciler's hand-over check). Caches keep objects
/// this way: managed fields are the largest part of most objects, and
/// nothing else in Tandem reads them.
pub fn slim_managed_fields(meta: &mut ObjectMeta) {
    let Some(entries) = meta.managed_fields.as_mut() else {
        return;
    };
    entries.retain(|m| {
        m.manager.as_deref() == Some(MANAGER) && m.operation.as_deref() == Some("Apply")
    });
    for entry in entries.iter_mut() {
        let replicas = entry
            .fields_v1
            .as_ref()
            .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some());
        entry.fields_v1 = Some(FieldsV1(if replicas {
            json!({"f:spec": {"f:replicas": {}}})
        } else {
            json!({})
        }));
    }
}

/// HybridApp condition types.
pub mod condition {
    /// Every workload has what it needs and routes can be served.
    pub const READY: &str = "Ready";
    /// Children are being created or rolled out.
    pub const PROGRESSING: &str = "Progressing";
    /// Something that was working is not.
    pub const DEGRADED: &str = "Degraded";
    /// kstatus: the controller has not caught up with the spec.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the controller cannot make progress (invalid spec).
    pub const STALLED: &str = "Stalled";
    /// Every route is at its spec's weights (no migration under way, rolled
    /// back or stalled).
    pub const MIGRATED: &str = "Migrated";
    /// Every live gateway serves the current generation of the app.
    pub const ROUTES_PROGRAMMED: &str = "RoutesProgrammed";
    /// The autoscaler's latest decisions (written by [`super::AUTOSCALER_MANAGER`]).
    pub const AUTOSCALED: &str = "Autoscaled";
}

/// Sets `replicas` of Deployment `name` through its `scale` subresource,
/// with server-side apply under [`AUTOSCALER_MANAGER`]: the one write of
/// `spec.replicas` in Tandem. Without `force`, a conflict with another owner
/// fails instead of taking the field (the reconciler's hand-over at
/// creation uses that).
pub async fn apply_scale(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: u32,
    force: bool,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    let mut params = PatchParams::apply(AUTOSCALER_MANAGER);
    params.force = force;
    deployments
        .patch_scale(name, &params, &Patch::Apply(&patch))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_names_are_dns_labels_and_distinct_when_cut_short() {
        assert_eq!(private_name("shop", "thumbs"), "shop-thumbs-private");
        let app = "a".repeat(32);
        let long = private_name(&app, &"b".repeat(30));
        let other = private_name(&app, &format!("{}c", "b".repeat(29)));
        assert_eq!(long.len(), 63);
        assert_eq!(other.len(), 63);
        assert_ne!(long, other);
        assert!(long.ends_with("-private") && long.starts_with(&app));
    }

    #[test]
    fn slimmed_managed_fields_keep_only_tandems_apply_and_its_hold_on_replicas() {
        let mut meta: ObjectMeta = serde_json::from_value(json!({"managedFields": [
            {"manager": MANAGER, "operation": "Apply",
             "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {}}}}},
            {"manager": MANAGER, "operation": "Update", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
             "fieldsV1": {"f:status": {}}},
            {"manager": AUTOSCALER_MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]}))
        .unwrap();
        slim_managed_fields(&mut meta);
        let slim = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            slim["managedFields"],
            json!([{"manager": MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}])
        );
        let mut released: ObjectMeta = serde_json::from_value(json!({"managedFields": [
            {"manager": MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {"f:template": {}}}}
        ]}))
        .unwrap();
        slim_managed_fields(&mut released);
        assert_eq!(
            serde_json::to_value(&released).unwrap()["managedFields"][0]["fieldsV1"],
            json!({})
        );
    }
}
