//! CRDs published in Go modules (the Gateway API's, the Prometheus
//! Operator's), fetched through the Go module proxy into the module cache
//! and applied with server-side apply (several are larger than client-side
//! apply's annotation limit).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;

/// Downloads `module@version` (the Go module cache) and returns its folder.
pub fn module_dir(module: &str, version: &str) -> Result<PathBuf> {
    let output = std::process::Command::new("go")
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .output()
        .with_context(|| format!("go mod download {module}"))?;
    if !output.status.success() {
        bail!(
            "go mod download {module}@{version} failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    #[derive(Deserialize)]
    struct Download {
        #[serde(rename = "Dir")]
        dir: PathBuf,
    }
    let download: Download = serde_json::from_slice(&output.stdout)?;
    Ok(download.dir)
}

/// Applies every CRD in the YAML files of `dir` whose file name `wanted`
/// accepts (other documents, such as a ValidatingAdmissionPolicy, are
/// skipped) and returns the CRDs' names.
pub async fn apply_dir(
    client: &kube::Client,
    dir: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    files.sort_by_key(|f| f.path());
    for file in files {
        let file_name = file.file_name().to_string_lossy().into_owned();
        if !file_name.ends_with(".yaml") || !wanted(&file_name) {
            continue;
        }
        let text = std::fs::read_to_string(file.path())?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)?;
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
