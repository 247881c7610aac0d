//! The HybridApp API at the real API server: the CRD installs, the examples
//! are accepted and round-trip, and invalid manifests are rejected with the
//! offending field named.

use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tandem::api::HybridApp;
use testenv::{TestNamespace, environment};

use crate::support::install_crd;

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("test YAML: {e}\n{text}"))
}

/// Sends `manifest` as raw JSON (not through the Rust types, which would
/// reject some of these cases before the server sees them).
async fn create_raw(ns: &TestNamespace, manifest: &Value) -> Result<Value, kube::Error> {
    let api: Api<kube::core::DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::core::ApiResource::erase::<HybridApp>(&()),
    );
    let object: kube::core::DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .map(|o| serde_json::to_value(o).unwrap())
}

fn manifest(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp", "metadata": {"name": name}, "spec": spec})
}

const FN: &str = "{name: fn, mode: Function, port: 8080, template: {spec: {containers: [{name: c, image: example/fn:1}]}}}";
const WEB: &str = "{name: web, mode: AlwaysOn, port: 8080, template: {spec: {containers: [{name: c, image: example/web:1}]}}}";

/// A spec with workloads `web` and `fn` and the given routes.
fn spec_with_routes(routes: &str) -> Value {
    yaml(&format!("{{workloads: [{WEB}, {FN}], routes: {routes}}}"))
}

/// A spec with one workload (`w`, patched by `workload`) and one route to it.
fn spec_with_workload(workload: &str) -> Value {
    let mut base: Value = yaml(FN);
    let patch: Value = yaml(workload);
    for (k, v) in patch.as_object().unwrap() {
        base[k] = v.clone();
    }
    let name = base["name"].as_str().unwrap().to_string();
    json!({"workloads": [base], "routes": [{"name": "all", "match": {"pathPrefix": "/"}, "backends": [{"workload": name}]}]})
}

struct Invalid {
    case: &'static str,
    spec: Value,
    name: &'static str,
    field: &'static str,
    says: &'static str,
}

fn invalid_cases() -> Vec<Invalid> {
    let one_route = "[{name: r, match: {pathPrefix: /}, backends: [{workload: web}]}]";
    let many_routes: Vec<Value> = (0..65)
        .map(|i| json!({"name": format!("r{i}"), "match": {"pathPrefix": format!("/p{i}")}, "backends": [{"workload": "web"}]}))
        .collect();
    let many_backends: Vec<Value> = (0..9)
        .map(|i| json!({"workload": format!("w{i}")}))
        .collect();
    let ok = |spec: Value| spec;
    vec![
        Invalid {
            case: "backend names an unknown workload",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: nope}]}]",
            ),
            field: "spec.routes",
            says: "must name a workload declared in spec.workloads",
        },
        Invalid {
            case: "duplicate workload names",
            name: "a",
            spec: yaml(&format!(
                "{{workloads: [{WEB}, {WEB}], routes: {one_route}}}"
            )),
            field: "spec.workloads[1]",
            says: "Duplicate value",
        },
        Invalid {
            case: "duplicate route names",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /a}, backends: [{workload: web}]}, {name: r, match: {pathPrefix: /b}, backends: [{workload: fn}]}]",
            ),
            field: "spec.routes[1]",
            says: "Duplicate value",
        },
        Invalid {
            case: "negative weight",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web, weight: -1}]}]",
            ),
            field: "spec.routes[0].backends[0].weight",
            says: "greater than or equal to 0",
        },
        Invalid {
            case: "all weights zero",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web, weight: 0}, {workload: fn, weight: 0}]}]",
            ),
            field: "spec.routes[0].backends",
            says: "at least one backend needs a weight above 0",
        },
        Invalid {
            case: "minReplicas above maxReplicas",
            name: "a",
            spec: spec_with_workload("{mode: AlwaysOn, scaling: {minReplicas: 5, maxReplicas: 3}}"),
            field: "spec.workloads[0].scaling.minReplicas",
            says: "must not exceed scaling.maxReplicas",
        },
        Invalid {
            case: "Function with minReplicas but no keepWarm",
            name: "a",
            spec: spec_with_workload("{scaling: {minReplicas: 1}}"),
            field: "spec.workloads[0].scaling.minReplicas",
            says: "unless scaling.keepWarm is true",
        },
        Invalid {
            case: "AlwaysOn with minReplicas 0",
            name: "a",
            spec: spec_with_workload("{mode: AlwaysOn, scaling: {minReplicas: 0}}"),
            field: "spec.workloads[0].scaling.minReplicas",
            says: "keeps at least 1 replica",
        },
        Invalid {
            case: "port 0",
            name: "a",
            spec: spec_with_workload("{port: 0}"),
            field: "spec.workloads[0].port",
            says: "greater than or equal to 1",
        },
        Invalid {
            case: "port above 65535",
            name: "a",
            spec: spec_with_workload("{port: 70000}"),
            field: "spec.workloads[0].port",
            says: "less than or equal to 65535",
        },
        Invalid {
            case: "path prefix without a leading slash",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: api}, backends: [{workload: web}]}]",
            ),
            field: "spec.routes[0].match.pathPrefix",
            says: "must start with '/'",
        },
        Invalid {
            case: "exact path without a leading slash",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {path: api/v1}, backends: [{workload: web}]}]",
            ),
            field: "spec.routes[0].match.path",
            says: "must start with '/'",
        },
        Invalid {
            case: "scaleToZeroAfter below the floor",
            name: "a",
            spec: spec_with_workload("{scaling: {scaleToZeroAfter: 2s}}"),
            field: "spec.workloads[0].scaling.scaleToZeroAfter",
            says: "between 10s and 24h",
        },
        Invalid {
            case: "scaleToZeroAfter that is not a duration",
            name: "a",
            spec: spec_with_workload("{scaling: {scaleToZeroAfter: ten seconds}}"),
            field: "spec.workloads[0].scaling.scaleToZeroAfter",
            says: "should match",
        },
        Invalid {
            case: "scaleToZeroAfter auto in the wrong case",
            name: "a",
            spec: spec_with_workload("{scaling: {scaleToZeroAfter: auto}}"),
            field: "spec.workloads[0].scaling.scaleToZeroAfter",
            says: "should match",
        },
        Invalid {
            case: "maxKeepAlive without scaleToZeroAfter: Auto",
            name: "a",
            spec: spec_with_workload("{scaling: {scaleToZeroAfter: 60s, maxKeepAlive: 1h}}"),
            field: "spec.workloads[0].scaling.maxKeepAlive",
            says: "only applies with scaleToZeroAfter: Auto",
        },
        Invalid {
            case: "maxKeepAlive above a day",
            name: "a",
            spec: spec_with_workload("{scaling: {scaleToZeroAfter: Auto, maxKeepAlive: 48h}}"),
            field: "spec.workloads[0].scaling.maxKeepAlive",
            says: "between 10s and 24h",
        },
        Invalid {
            case: "scaleToZeroAfter on an AlwaysOn workload",
            name: "a",
            spec: spec_with_workload("{mode: AlwaysOn, scaling: {scaleToZeroAfter: 60s}}"),
            field: "spec.workloads[0].scaling.scaleToZeroAfter",
            says: "only a Function (or Auto) workload scales to zero",
        },
        Invalid {
            case: "placement without mode: Auto",
            name: "a",
            spec: spec_with_workload("{placement: {minDwell: 1m}}"),
            field: "spec.workloads[0].placement",
            says: "only applies with mode: Auto",
        },
        Invalid {
            case: "a cold-start budget that is not a percent",
            name: "a",
            spec: spec_with_workload("{mode: Auto, placement: {coldStartBudget: '1'}}"),
            field: "spec.workloads[0].placement.coldStartBudget",
            says: "must be a percent",
        },
        Invalid {
            case: "a dwell under 10s",
            name: "a",
            spec: spec_with_workload("{mode: Auto, placement: {minDwell: 1s}}"),
            field: "spec.workloads[0].placement.minDwell",
            says: "between 10s and 24h",
        },
        Invalid {
            case: "keepWarm on an Auto workload",
            name: "a",
            spec: spec_with_workload("{mode: Auto, scaling: {keepWarm: true}}"),
            field: "spec.workloads[0].scaling.keepWarm",
            says: "only applies to a Function",
        },
        Invalid {
            case: "cpu metric on a Function",
            name: "a",
            spec: spec_with_workload("{scaling: {metric: cpu}}"),
            field: "spec.workloads[0].scaling.metric",
            says: "metric applies to AlwaysOn",
        },
        Invalid {
            case: "workload name that is not a DNS label",
            name: "a",
            spec: spec_with_workload("{name: Web_1}"),
            field: "spec.workloads[0].name",
            says: "must be a DNS label",
        },
        Invalid {
            case: "route name that is not a DNS label",
            name: "a",
            spec: spec_with_routes(
                "[{name: -r, match: {pathPrefix: /}, backends: [{workload: web}]}]",
            ),
            field: "spec.routes[0].name",
            says: "must be a DNS label",
        },
        Invalid {
            case: "HybridApp name too long for child names",
            name: "an-app-name-that-is-far-too-long-for-children",
            spec: spec_with_routes(one_route),
            field: "metadata.name",
            says: "at most 32 characters",
        },
        Invalid {
            case: "empty workload list",
            name: "a",
            spec: yaml(&format!("{{workloads: [], routes: {one_route}}}")),
            field: "spec.workloads",
            says: "at least 1 items",
        },
        Invalid {
            case: "empty route list",
            name: "a",
            spec: yaml(&format!("{{workloads: [{WEB}], routes: []}}")),
            field: "spec.routes",
            says: "at least 1 items",
        },
        Invalid {
            case: "too many routes",
            name: "a",
            spec: ok(json!({"workloads": [yaml(WEB)], "routes": many_routes})),
            field: "spec.routes",
            says: "at most 64 items",
        },
        Invalid {
            case: "too many backends",
            name: "a",
            spec: ok(
                json!({"workloads": [yaml(WEB)], "routes": [{"name": "r", "match": {"pathPrefix": "/"}, "backends": many_backends}]}),
            ),
            field: "spec.routes[0].backends",
            says: "at most 8 items",
        },
        Invalid {
            case: "both path and pathPrefix",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {path: /a, pathPrefix: /b}, backends: [{workload: web}]}]",
            ),
            field: "spec.routes[0].match",
            says: "set exactly one of path (exact) or pathPrefix",
        },
        Invalid {
            case: "two routes with the same match",
            name: "a",
            spec: spec_with_routes(
                "[{name: a, match: {pathPrefix: /x}, backends: [{workload: web}]}, {name: b, match: {pathPrefix: /x}, backends: [{workload: fn}]}]",
            ),
            field: "spec.routes",
            says: "two routes have the same match",
        },
        Invalid {
            case: "unknown mode",
            name: "a",
            spec: spec_with_workload("{mode: Lambda}"),
            field: "spec.workloads[0].mode",
            says: "Unsupported value",
        },
        Invalid {
            case: "host with a scheme",
            name: "a",
            spec: {
                let mut s = spec_with_routes(one_route);
                s["hosts"] = json!(["https://shop.example.com"]);
                s
            },
            field: "spec.hosts",
            says: "lowercase DNS name",
        },
        Invalid {
            case: "request timeout above 15m",
            name: "a",
            spec: spec_with_workload("{requestTimeout: 1h}"),
            field: "spec.workloads[0].requestTimeout",
            says: "between 1s and 15m",
        },
        Invalid {
            case: "migration steps that go down",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web}], migration: {steps: [50, 25, 100]}}]",
            ),
            field: "spec.routes[0].migration.steps",
            says: "steps must increase",
        },
        Invalid {
            case: "migration steps that do not end at 100",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web}], migration: {steps: [10, 50]}}]",
            ),
            field: "spec.routes[0].migration.steps",
            says: "the last step is 100",
        },
        Invalid {
            case: "migration error rate that is not a percent",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web}], migration: {steps: [100], analysis: {maxErrorRate: '0.01'}}}]",
            ),
            field: "spec.routes[0].migration.analysis.maxErrorRate",
            says: "must be a percent",
        },
        Invalid {
            case: "migration step interval below 1s",
            name: "a",
            spec: spec_with_routes(
                "[{name: r, match: {pathPrefix: /}, backends: [{workload: web}], migration: {steps: [100], stepInterval: 100ms}}]",
            ),
            field: "spec.routes[0].migration.stepInterval",
            says: "between 1s and 1h",
        },
        Invalid {
            case: "pod template without containers",
            name: "a",
            spec: spec_with_workload("{template: {spec: {containers: []}}}"),
            field: "spec.workloads[0].template.spec.containers",
            says: "at least 1 items",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_rejected_with_the_field_named() {
    install_crd().await;
    let ns = TestNamespace::create("invalid").await;
    let cases = invalid_cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        match create_raw(&ns, &manifest(case.name, case.spec.clone())).await {
            Err(kube::Error::Api(status)) => {
                let ok = status.code == 422
                    && status.message.contains(&format!("{}:", case.field))
                    && status.message.contains(case.says);
                if !ok {
                    failures.push(format!(
                        "{}: expected 422 naming `{}` and saying `{}`, got {}: {}",
                        case.case, case.field, case.says, status.code, status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{}: unexpected error {other}", case.case)),
            Ok(_) => failures.push(format!("{}: accepted, expected a rejection", case.case)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_accepted_and_round_trip_unchanged() {
    install_crd().await;
    let ns = TestNamespace::create("examples").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let sent: Value = yaml(&std::fs::read_to_string(&file).unwrap());
        let stored = create_raw(&ns, &sent)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", file.display()));
        assert_eq!(
            stored["spec"],
            sent["spec"],
            "{}: the server changed the spec",
            file.display()
        );
        // Read back through the typed API as well.
        let apps: Api<HybridApp> = ns.api();
        let typed = apps
            .get(sent["metadata"]["name"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(
            serde_json::to_value(&typed.spec).unwrap(),
            sent["spec"],
            "{}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_shows_the_field_descriptions() {
    install_crd().await;
    let kubeconfig = environment().control_plane.kubeconfig.clone();
    let kubectl = testenv::kube_tools_dir().unwrap().join("kubectl");
    let explain = |path: &'static str| {
        let kubeconfig = kubeconfig.clone();
        let kubectl = kubectl.clone();
        async move {
            // Published OpenAPI lags the CRD by a moment.
            testenv::wait_for(
                &format!("kubectl explain {path}"),
                std::time::Duration::from_secs(30),
                || {
                    let kubeconfig = kubeconfig.clone();
                    let kubectl = kubectl.clone();
                    async move {
                        let output = tokio::process::Command::new(&kubectl)
                            .arg("--kubeconfig")
                            .arg(&kubeconfig)
                            .args(["explain", path])
                            .output()
                            .await
                            .map_err(|e| format!("run kubectl: {e}"))?;
                        let text = String::from_utf8_lossy(&output.stdout).into_owned();
                        if output.status.success() {
                            Ok(text)
                        } else {
                            Err(String::from_utf8_lossy(&output.stderr).into_owned())
                        }
                    }
                },
            )
            .await
        }
    };
    let scaling = explain("hybridapp.spec.workloads.scaling").await;
    assert!(scaling.contains("scaleToZeroAfter"), "{scaling}");
    assert!(
        scaling.contains("idle time (no request in flight or queued)"),
        "{scaling}"
    );
    assert!(scaling.contains("keepWarm"), "{scaling}");
    let routes = explain("hybridapps.spec.routes").await;
    assert!(routes.contains("The most specific match wins"), "{routes}");
}
