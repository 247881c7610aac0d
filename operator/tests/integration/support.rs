//! Shared helpers of the integration tests.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use tandem::api::HybridApp;
use testenv::{environment, wait_for};
use tokio::sync::OnceCell;

/// Installs the HybridApp CRD once per test binary and waits until it is served.
pub async fn install_crd() {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let client = environment().client().await;
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let crd = HybridApp::crd();
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(
                &name,
                &PatchParams::apply("tandem-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("the API server accepts the CRD (structural schema, CEL cost)");
            wait_for(
                "the HybridApp CRD to be established",
                std::time::Duration::from_secs(30),
                || async {
                    let crd = crds.get(&name).await.map_err(|e| e.to_string())?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if established {
                        Ok(())
                    } else {
                        Err("not established".into())
                    }
                },
            )
            .await;
            // Discovery lags Established by a moment; wait until lists work.
            let apps: Api<HybridApp> = Api::all(client);
            wait_for(
                "hybridapps to be listable",
                std::time::Duration::from_secs(30),
                || async {
                    apps.list(&Default::default())
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                },
            )
            .await;
        })
        .await;
}
