//! Labels Tandem puts on the objects it creates. They are part of the API
//! contract: the gateway finds a workload's EndpointSlices by them.

use serde_json::{Value, json};

use super::Mode;

/// `app.kubernetes.io/managed-by`: always `tandem` on our children.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`].
pub const MANAGER: &str = "tandem";
/// Name of the owning HybridApp.
pub const APP: &str = "tandem.dev/app";
/// Name of the workload inside the HybridApp.
pub const WORKLOAD: &str = "tandem.dev/workload";
/// `function` or `always-on`.
pub const MODE: &str = "tandem.dev/mode";
/// On Services (and so on their EndpointSlices): `public` for the
/// workload's own Service `<app>-<workload>`, which callers use, `private`
/// for the headless one that selects its pods, which the gateways use.
pub const SERVICE: &str = "tandem.dev/service";
/// [`SERVICE`] of the Service callers use.
pub const PUBLIC: &str = "public";
/// [`SERVICE`] of the Service that selects the pods.
pub const PRIVATE: &str = "private";
/// The EndpointSlice label naming the Service a slice belongs to.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The EndpointSlice label naming who writes a slice.
pub const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// [`SLICE_MANAGED_BY`] of the slices Tandem writes for a public Service
/// that points at the gateways.
pub const SLICE_MANAGER: &str = "tandem.dev";

/// Label selector for every object Tandem manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGER}")
}

/// The labels that select one workload's pods (never change for a workload,
/// as a Deployment's selector is immutable).
pub fn selector(app: &str, workload: &str) -> Value {
    json!({APP: app, WORKLOAD: workload})
}

/// Labels of a workload's pods: no mode, so a workload whose mode changes
/// in place keeps its pods (no rollout).
pub fn pod(app: &str, workload: &str) -> Value {
    json!({
        MANAGED_BY: MANAGER,
        APP: app,
        WORKLOAD: workload,
    })
}

/// All labels of a workload's children.
pub fn workload(app: &str, workload: &str, mode: Mode) -> Value {
    json!({
        MANAGED_BY: MANAGER,
        APP: app,
        WORKLOAD: workload,
        MODE: mode_value(mode),
    })
}

/// Labels of a workload's Service of one [`SERVICE`] kind.
pub fn service(app: &str, workload: &str, mode: Mode, kind: &str) -> Value {
    let mut labels = self::workload(app, workload, mode);
    labels[SERVICE] = Value::String(kind.into());
    labels
}

/// The [`MODE`] label value.
pub fn mode_value(mode: Mode) -> &'static str {
    match mode {
        Mode::Function => "function",
        Mode::AlwaysOn => "always-on",
        Mode::Auto => "auto",
    }
}
