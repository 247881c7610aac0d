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

/// The [`MODE`] label value.
pub fn mode_value(mode: Mode) -> &'static str {
    match mode {
        Mode::Function => "function",
        Mode::AlwaysOn => "always-on",
    }
}
