//! What the reconciler and the autoscaler both rely on, kept with the API
//! types so that neither imports the other: who writes which fields (field
//! managers), what the children are called, the condition types, and the one
//! function that writes `spec.replicas`.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Field manager of every reconciler write (children, status).
pub const MANAGER: &str = "tandem";
/// Field manager that owns `spec.replicas` of the Deployments Tandem
/// scales, and the `Autoscaled` condition.
pub const AUTOSCALER_MANAGER: &str = "tandem-autoscaler";

/// Name of the Deployment and Service of `workload` in `app`.
pub fn child_name(app: &str, workload: &str) -> String {
    format!("{app}-{workload}")
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
