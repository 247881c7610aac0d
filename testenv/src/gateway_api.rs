//! The Gateway API CRDs (standard channel), from the published
//! `sigs.k8s.io/gateway-api` Go module.

use std::path::PathBuf;

use anyhow::Result;

/// The pinned release (v1.7 needs a newer Go than our machines have).
pub const VERSION: &str = "v1.6.3";

/// Downloads the module (Go module cache) and returns its CRD folder.
pub fn crd_dir() -> Result<PathBuf> {
    Ok(crate::crds::module_dir("sigs.k8s.io/gateway-api", VERSION)?
        .join("config")
        .join("crd")
        .join("standard"))
}

/// Applies every standard-channel CRD and returns their names.
pub async fn install(client: &kube::Client) -> Result<Vec<String>> {
    let dir = tokio::task::spawn_blocking(crd_dir).await??;
    crate::crds::apply_dir(client, &dir, |_| true).await
}
