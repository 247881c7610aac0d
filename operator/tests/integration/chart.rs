//! The Helm chart: lint, schema, server-side dry run under Pod Security
//! "restricted", and a real `helm install` whose operator and gateway run as
//! pods of the process kubelet (the Tandem image mapped to the `tandem`
//! binary under test, with the pod's ServiceAccount credentials).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use testenv::kubelet::ImageProgram;
use testenv::{TestNamespace, environment, wait_for};

use crate::support::install_crd;

const IMAGE: &str = "ghcr.io/tandem-dev/tandem";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> String {
    repo().join("charts/tandem").display().to_string()
}

/// Runs `helm` or `kubectl` against the testenv API server.
async fn tool(name: &str, args: &[&str], stdin: Option<Vec<u8>>) -> Output {
    let program = testenv::kube_tools_dir()
        .expect("kubectl and helm")
        .join(name);
    let kubeconfig = environment().control_plane.kubeconfig.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(&program)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        let mut input = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            input.write_all(&bytes).expect("write stdin");
        }
        drop(input);
        child.wait_with_output().expect("wait for the tool")
    })
    .await
    .expect("tool thread")
}

/// Runs `helm` or `kubectl` and fails the test, with its output, unless it succeeds.
async fn succeed(name: &str, args: &[&str]) -> Output {
    let output = tool(name, args, None).await;
    assert!(
        output.status.success(),
        "{name} {args:?}: {}",
        text(&output)
    );
    output
}

/// Warnings the API server sent back (Pod Security among them), as kubectl
/// (`Warning: ...`) and helm (client-go's `warnings.go` log lines) print
/// them; client-side log lines that merely mention a warning do not count.
fn server_warnings(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("Warning:")
                || l.contains("warnings.go")
                || l.contains("would violate PodSecurity")
        })
        .map(str::to_string)
        .collect()
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn restricted(namespace: &str) {
    let namespaces: Api<Namespace> = Api::all(environment().client().await);
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/audit": "restricted",
    }}});
    namespaces
        .patch(namespace, &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("label the namespace restricted");
}

#[tokio::test]
async fn chart_lints_clean_and_its_schema_names_a_bad_value() {
    let lint = tool("helm", &["lint", "--strict", &chart()], None).await;
    assert!(lint.status.success(), "helm lint: {}", text(&lint));
    assert!(
        String::from_utf8_lossy(&lint.stdout).contains("0 chart(s) failed"),
        "{}",
        text(&lint)
    );

    for (set, expected) in [
        ("operator.replicas=-1", "/operator/replicas"),
        (
            "gateway.replicass=2",
            "additional properties 'replicass' not allowed",
        ),
        ("logFormat=xml", "/logFormat"),
        (
            "gateway.headerReadTimeout=soon",
            "/gateway/headerReadTimeout",
        ),
    ] {
        let output = tool("helm", &["template", "t", &chart(), "--set", set], None).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "--set {set} should fail naming {expected:?}: {}",
            text(&output)
        );
    }
}

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run_under_restricted_pod_security() {
    install_crd().await;
    let release_ns = TestNamespace::create("chart-dry").await;
    let apps_ns = TestNamespace::create("chart-dry-apps").await;
    restricted(&release_ns.name).await;
    let watch = format!("operator.watchNamespace={}", apps_ns.name);
    let serve = format!("gateway.namespaces={{{}}}", apps_ns.name);
    let sample = repo().join("charts/tandem/ci/sample-values.yaml");
    let sample = sample.display().to_string();
    let ns = release_ns.name.as_str();
    let default_values: Vec<&str> = vec!["template", "dry", "--namespace", ns];
    let sample_values: Vec<&str> = vec![
        "template",
        "dry",
        "--namespace",
        ns,
        "--values",
        &sample,
        "--set",
        &watch,
        "--set",
        &serve,
    ];
    for values in [default_values, sample_values] {
        let mut args = values.clone();
        let chart = chart();
        args.insert(2, &chart);
        let rendered = tool("helm", &args, None).await;
        assert!(
            rendered.status.success(),
            "helm template: {}",
            text(&rendered)
        );
        let applied = tool(
            "kubectl",
            &["apply", "--dry-run=server", "-f", "-"],
            Some(rendered.stdout.clone()),
        )
        .await;
        assert!(
            applied.status.success(),
            "dry run of {args:?}: {}",
            text(&applied)
        );
        let stdout = String::from_utf8_lossy(&applied.stdout);
        for kind in ["deployment.apps", "service", "serviceaccount", "role"] {
            assert!(stdout.contains(kind), "{kind} missing: {}", text(&applied));
        }
        // Pod Security warnings (the namespace warns on "restricted") or
        // any other warning fail the test.
        assert!(
            server_warnings(&applied).is_empty(),
            "warnings: {}",
            text(&applied)
        );
    }
}

#[tokio::test]
async fn helm_install_runs_the_operator_and_gateway_as_pods_and_uninstall_leaves_only_the_crd() {
    install_crd().await;
    let env = environment();
    env.kubelet.map_image(ImageProgram {
        image: IMAGE.into(),
        program: PathBuf::from(env!("CARGO_BIN_EXE_tandem")),
        own_network: false,
    });
    let release_ns = TestNamespace::create("chart").await;
    let apps_ns = TestNamespace::create("chart-apps").await;
    restricted(&release_ns.name).await;
    let release = format!("tandem-{}", &release_ns.name[release_ns.name.len() - 6..]);
    let values = repo()
        .join("testenv/demo-values.yaml")
        .display()
        .to_string();
    let watch = format!("operator.watchNamespace={}", apps_ns.name);
    let serve = format!("gateway.namespaces={{{}}}", apps_ns.name);
    let install = succeed(
        "helm",
        &[
            "install",
            &release,
            &chart(),
            "--namespace",
            &release_ns.name,
            "--values",
            &values,
            "--set",
            &watch,
            "--set",
            &serve,
            // Two operators: one leads, the standby answers the gateway 503.
            "--set",
            "operator.replicas=2",
            "--wait",
            "--timeout",
            "3m",
        ],
    )
    .await;
    assert!(
        server_warnings(&install).is_empty(),
        "helm install warned: {}",
        text(&install)
    );

    // Both components run as Ready pods, from the chart's args and env.
    let pods: Api<Pod> = release_ns.api();
    let selector = format!("app.kubernetes.io/instance={release}");
    let ready_ips = wait_for(
        "the gateway and both operator pods to be Ready",
        Duration::from_secs(60),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| e.to_string())?;
            let mut ready = Vec::new();
            for pod in &list.items {
                let status = pod.status.clone().unwrap_or_default();
                let is_ready = status
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let component =
                    pod.metadata.labels.clone().unwrap_or_default()["app.kubernetes.io/component"]
                        .clone();
                if is_ready {
                    ready.push((component, status.pod_ip.unwrap_or_default()));
                }
            }
            ready.sort();
            if ready.len() == 3 {
                Ok(ready)
            } else {
                Err(format!("ready: {ready:?} of {} pods", list.items.len()))
            }
        },
    )
    .await;
    let components: Vec<&str> = ready_ips.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(components, ["gateway", "operator", "operator"]);
    let gateway = ready_ips[0].1.clone();

    // An example HybridApp becomes Ready, and the gateway reaches each workload.
    let shop = repo().join("examples/shop.yaml").display().to_string();
    succeed("kubectl", &["apply", "-n", &apps_ns.name, "-f", &shop]).await;
    succeed(
        "kubectl",
        &[
            "wait",
            "-n",
            &apps_ns.name,
            "--for=condition=Ready",
            "hybridapp/shop",
            "--timeout=120s",
        ],
    )
    .await;
    for (path, workload) in [
        ("/checkout", "shop-storefront-"),
        ("/thumbnail/cold.png", "shop-thumbnails-"),
    ] {
        let answer = testenv::http_client::get(&format!("http://{gateway}:8080{path}"))
            .await
            .unwrap_or_else(|e| panic!("GET {path} through the gateway pod: {e:#}"));
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        assert!(
            answer.body.contains(&format!("pod={workload}")),
            "{path} should reach {workload}: {}",
            answer.body
        );
    }

    // The chart's RBAC was enough: nothing was forbidden.
    for pod in env.running_pods(&release_ns.name) {
        let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
        let refused = crate::support::refusals(&log);
        assert!(
            refused.is_empty(),
            "{} was refused something:\n{}",
            pod.name,
            refused.join("\n")
        );
    }

    succeed(
        "helm",
        &[
            "uninstall",
            &release,
            "--namespace",
            &release_ns.name,
            "--wait",
            "--timeout",
            "2m",
        ],
    )
    .await;
    wait_for(
        "helm uninstall to leave nothing of the release",
        Duration::from_secs(60),
        || async {
            let output = tool(
                "kubectl",
                &[
                    "get",
                    "all,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,poddisruptionbudgets,leases",
                    "--all-namespaces",
                    "-l",
                    &selector,
                    "-o",
                    "name",
                ],
                None,
            )
            .await;
            let names = String::from_utf8_lossy(&output.stdout).trim().to_string();
            let running = env.running_pods(&release_ns.name).len();
            if output.status.success() && names.is_empty() && running == 0 {
                Ok(())
            } else {
                Err(format!("left: {names:?}, {running} pod processes; {}", text(&output)))
            }
        },
    )
    .await;
    let crd = tool(
        "kubectl",
        &["get", "crd", "hybridapps.tandem.dev", "-o", "name"],
        None,
    )
    .await;
    assert!(crd.status.success(), "Helm keeps the CRD: {}", text(&crd));
}

/// Runs `promtool` (Debian's `prometheus` package; `.ci/run` installs it).
fn promtool(args: &[&str], dir: &Path) -> Output {
    std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("run promtool (install Debian's prometheus package, as .ci/run does): {e}")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_rules_pass_promtool_and_the_monitoring_objects_pass_the_prometheus_operator_crds()
 {
    let files = repo().join("charts/tandem/files");
    let check = promtool(&["check", "rules", "prometheus-rules.yaml"], &files);
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        text(&check)
    );
    let unit = promtool(&["test", "rules", "prometheus-rules.test.yaml"], &files);
    assert!(
        unit.status.success(),
        "promtool test rules: {}",
        text(&unit)
    );

    // Every metric the rules read is one Tandem registers.
    let rules = std::fs::read_to_string(files.join("prometheus-rules.yaml")).unwrap();
    let mut sources = String::new();
    for file in [
        "gateway/metrics.rs",
        "gateway/mod.rs",
        "controller/metrics.rs",
        "autoscaler/metrics.rs",
        "operator.rs",
    ] {
        sources += &std::fs::read_to_string(repo().join("operator/src").join(file)).unwrap();
    }
    let mut names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("tandem_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let base = ["_total", "_bucket"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "the rules read {name}, which nothing registers"
        );
    }

    // With every monitoring value on, the chart renders a PrometheusRule
    // whose spec is the rule file, a ServiceMonitor, a PodMonitor and the
    // dashboard's ConfigMap.
    let all_on = "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,\
                  metrics.dashboard.enabled=true";
    let rendered = succeed("helm", &["template", "t", &chart(), "--set", all_on]).await;
    let documents: Vec<serde_json::Value> = serde_yaml::Deserializer::from_slice(&rendered.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_json::Value| !d.is_null())
        .collect();
    let of_kind = |kind: &str| {
        documents
            .iter()
            .filter(|d| d["kind"] == kind)
            .cloned()
            .collect::<Vec<_>>()
    };
    let rule = of_kind("PrometheusRule");
    assert_eq!(rule.len(), 1);
    let file: serde_json::Value = serde_yaml::from_str(&rules).unwrap();
    assert_eq!(
        rule[0]["spec"], file,
        "the PrometheusRule's spec is files/prometheus-rules.yaml"
    );
    let monitors = of_kind("ServiceMonitor");
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["honorLabels"], true);
    let pods = of_kind("PodMonitor");
    assert_eq!(pods[0]["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    assert_eq!(
        pods[0]["spec"]["podMetricsEndpoints"][0]["honorLabels"],
        true
    );
    let dashboards: Vec<_> = of_kind("ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(dashboards.len(), 1, "one dashboard ConfigMap");
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(files.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let in_chart: serde_json::Value =
        serde_json::from_str(dashboards[0]["data"]["tandem-apps.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        in_chart, shipped,
        "the ConfigMap holds files/grafana-dashboard.json"
    );

    // The monitoring objects pass the Prometheus Operator's own CRD schemas
    // (from its Go module), in a server-side dry run of the whole render.
    install_crd().await;
    let client = environment().client().await;
    let names = testenv::prometheus_operator::install(&client)
        .await
        .expect("the Prometheus Operator CRDs install");
    assert_eq!(names.len(), 3, "{names:?}");
    let ns = TestNamespace::create("chart-monitoring").await;
    let rendered = succeed(
        "helm",
        &[
            "template",
            "t",
            &chart(),
            "--namespace",
            &ns.name,
            "--set",
            all_on,
        ],
    )
    .await;
    let kubectl_dry_run = || async {
        let applied = tool(
            "kubectl",
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(rendered.stdout.clone()),
        )
        .await;
        if applied.status.success() {
            Ok(applied)
        } else {
            Err(text(&applied))
        }
    };
    // The new CRDs take a moment to be served.
    let applied = wait_for(
        "a server-side dry run with every monitoring value on",
        Duration::from_secs(30),
        kubectl_dry_run,
    )
    .await;
    let stdout = String::from_utf8_lossy(&applied.stdout);
    for object in [
        "servicemonitor.monitoring.coreos.com/t-tandem-operator",
        "podmonitor.monitoring.coreos.com/t-tandem-gateway",
        "prometheusrule.monitoring.coreos.com/t-tandem",
        "configmap/t-tandem-dashboard",
    ] {
        assert!(
            stdout.contains(object),
            "{object} missing: {}",
            text(&applied)
        );
    }
    assert!(
        server_warnings(&applied).is_empty(),
        "warnings: {}",
        text(&applied)
    );
    // A PrometheusRule the CRD refuses is refused: the dry run is a check.
    let bad = tool(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-n",
            &ns.name,
            "-f",
            "-",
        ],
        Some(
            br#"{"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                 "metadata": {"name": "bad"}, "spec": {"groups": [{"rules": []}]}}"#
                .to_vec(),
        ),
    )
    .await;
    assert!(
        !bad.status.success() && text(&bad).contains("name"),
        "a group without a name should be refused: {}",
        text(&bad)
    );
    // Off by default; the plain scrape annotations are on.
    let plain = succeed("helm", &["template", "t", &chart()]).await;
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(!plain.contains("monitoring.coreos.com"), "{plain}");
    assert_eq!(plain.matches("prometheus.io/scrape: \"true\"").count(), 2);
}
