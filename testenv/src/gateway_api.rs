//! The Gateway API CRDs (standard channel), from the published
//! `sigs.k8s.io/gateway-api` Go module, applied with server-side apply (the
//! HTTPRoute CRD is larger than client-side apply's annotation limit).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;

/// The pinned release (v1.7 needs a newer Go than our machines have).
pub const VERSION: &str = "v1.6.3";

/// Downloads the module (Go module cache) and returns its CRD folder.
pub fn crd_dir() -> Result<PathBuf> {
    let output = std::process::Command::new("go")
        .args([
            "mod",
            "download",
            "-json",
            &format!("sigs.k8s.io/gateway-api@{VERSION}"),
        ])
        .output()
        .context("go mod download sigs.k8s.io/gateway-api")?;
    if !output.status.success() {
        bail!(
            "go mod download failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    #[derive(Deserialize)]
    struct Download {
        #[serde(rename = "Dir")]
        dir: PathBuf,
    }
    let download: Download = serde_json::from_slice(&output.stdout)?;
    Ok(download.dir.join("config").join("crd").join("standard"))
}

/// Applies every standard-channel CRD and returns their names.
pub async fn install(client: &kube::Client) -> Result<Vec<String>> {
    let dir = tokio::task::spawn_blocking(crd_dir).await??;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    files.sort_by_key(|f| f.path());
    for file in files {
        let text = std::fs::read_to_string(file.path())?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)?;
            // One file holds a ValidatingAdmissionPolicy, not a CRD.
            if value.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml::from_value(value)?;
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            crds.patch(
                &name,
                &PatchParams::apply("testenv").force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("apply {name}"))?;
            names.push(name);
        }
    }
    Ok(names)
}
