//! The Prometheus Operator's CRDs (`ServiceMonitor`, `PodMonitor`,
//! `PrometheusRule`), as its Go module publishes them
//! (`example/prometheus-operator-crd`), for server-side dry runs of what the
//! chart renders.

use anyhow::Result;

/// The module the CRDs come from.
pub const MODULE: &str = "github.com/prometheus-operator/prometheus-operator";

/// The pinned release (one the module proxy here serves).
pub const VERSION: &str = "v0.92.1";

/// The CRDs applied: the kinds Tandem's chart renders.
const KINDS: [&str; 3] = ["servicemonitors", "podmonitors", "prometheusrules"];

/// Applies the ServiceMonitor, PodMonitor and PrometheusRule CRDs and
/// returns their names.
pub async fn install(client: &kube::Client) -> Result<Vec<String>> {
    let dir = tokio::task::spawn_blocking(|| crate::crds::module_dir(MODULE, VERSION)).await??;
    let dir = dir.join("example").join("prometheus-operator-crd");
    crate::crds::apply_dir(client, &dir, |file| {
        KINDS
            .iter()
            .any(|kind| file == format!("monitoring.coreos.com_{kind}.yaml"))
    })
    .await
}
