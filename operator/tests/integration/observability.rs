//! Observability with the real tool: a Prometheus server (Debian's
//! `prometheus`, as `.ci/run` installs it) scrapes a running operator and
//! gateway, evaluates the chart's recording rules and alerts, and answers
//! every query of the chart's Grafana dashboard, through its HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tandem::api::HybridApp;
use testenv::{TestNamespace, wait_for};

use crate::gateway::GatewayHandle;
use crate::support::{OperatorProcess, install_crd, operator_kubeconfig};

fn files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tandem/files")
}

/// A Prometheus server on loopback, scraping fixed targets every second.
struct Prometheus {
    process: testenv::process::ChildProcess,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with the chart's rule file (alerts' `for` cut to
    /// 2 s so that the test need not wait minutes; every expression as
    /// shipped) scraping `targets` (job, address). Each target carries the
    /// `namespace` and `pod` labels that Kubernetes service discovery
    /// gives, and `honor_labels` as the chart's monitors set it.
    async fn start(dir: &Path, targets: &[(&str, SocketAddr)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut rules: Value = serde_yaml::from_str(
            &std::fs::read_to_string(files().join("prometheus-rules.yaml")).unwrap(),
        )
        .unwrap();
        for group in rules["groups"].as_array_mut().unwrap() {
            group["interval"] = json!("1s");
            for rule in group["rules"].as_array_mut().unwrap() {
                if rule.get("for").is_some() {
                    rule["for"] = json!("2s");
                }
            }
        }
        let rules_file = dir.join("rules.yaml");
        std::fs::write(&rules_file, serde_yaml::to_string(&rules).unwrap()).unwrap();
        let scrape: Vec<Value> = targets
            .iter()
            .map(|(job, addr)| {
                json!({
                    "job_name": job,
                    "honor_labels": true,
                    "static_configs": [{
                        "targets": [addr.to_string()],
                        "labels": {"namespace": "tandem-system", "pod": format!("{job}-0")},
                    }],
                })
            })
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [rules_file.display().to_string()],
            "scrape_configs": scrape,
        });
        let config_file = dir.join("prometheus.yaml");
        std::fs::write(&config_file, serde_yaml::to_string(&config).unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join("prometheus.log");
        let spec = testenv::process::ProcessSpec {
            program: "prometheus".into(),
            args: vec![
                format!("--config.file={}", config_file.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={addr}"),
                "--storage.tsdb.retention.time=1h".into(),
            ],
            env: vec![],
            log: log.clone(),
            netns: None,
        };
        let process = testenv::process::spawn(spec)
            .expect("start prometheus (Debian's prometheus package, as .ci/run installs it)");
        let prometheus = Self { process, addr, log };
        wait_for(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async {
                if !prometheus.process.is_running() {
                    panic!("prometheus exited:\n{}", prometheus.log_text());
                }
                match testenv::http_client::get(&format!("http://{addr}/-/ready")).await {
                    Ok(answer) if answer.status == 200 => Ok(()),
                    Ok(answer) => Err(format!("{}: {}", answer.status, answer.body)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        prometheus
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>?<name>=<value>...`: the `data` of a successful
    /// answer, or the error Prometheus gave.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let answer =
            testenv::http_client::get(&format!("http://{}/api/v1/{path}?{query}", self.addr))
                .await
                .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&answer.body)
            .map_err(|e| format!("{}: {e}: {}", answer.status, answer.body))?;
        if answer.status == 200 && body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", answer.status, answer.body))
        }
    }

    /// The instant vector `promql` evaluates to now.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", promql)]).await?;
        if data["resultType"] != "vector" {
            return Err(format!("not a vector: {data}"));
        }
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of the one sample `promql` gives (an error if none, or
    /// more than one).
    async fn value(&self, promql: &str) -> Result<f64, String> {
        let result = self.query(promql).await?;
        match result.as_slice() {
            [sample] => sample["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("{promql}: {sample}")),
            other => Err(format!("{promql}: {} samples: {other:?}", other.len())),
        }
    }

    /// Waits until `promql` has one sample that `ok` accepts; returns it.
    async fn wait_value(&self, what: &str, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        wait_for(what, Duration::from_secs(60), || async {
            let value = self.value(promql).await?;
            if ok(value) {
                Ok(value)
            } else {
                Err(format!("{promql} = {value}"))
            }
        })
        .await
    }

    /// The state of alert rule `name` (inactive, pending, firing) and its
    /// alerts, from /api/v1/rules.
    async fn alert(&self, name: &str) -> Result<(String, Vec<Value>), String> {
        let data = self.api("rules", &[("type", "alert")]).await?;
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                if rule["name"] == name {
                    if rule["health"] != "ok" {
                        return Err(format!("{name}: {rule}"));
                    }
                    return Ok((
                        rule["state"].as_str().unwrap_or_default().to_string(),
                        rule["alerts"].as_array().cloned().unwrap_or_default(),
                    ));
                }
            }
        }
        Err(format!("no alert rule {name}: {data}"))
    }

    /// Waits until alert rule `name` is in `state`; returns its alerts.
    async fn wait_alert(&self, name: &str, state: &str) -> Vec<Value> {
        wait_for(
            &format!("alert {name} to be {state}"),
            Duration::from_secs(60),
            || async {
                let (now, alerts) = self.alert(name).await?;
                if now == state {
                    Ok(alerts)
                } else {
                    Err(format!("{now}: {alerts:?}"))
                }
            },
        )
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Sends `count` requests for `path` (8 at a time), with header
/// `x-echo-status: 500` on the first `failing`; returns the statuses.
async fn send(gateway: &GatewayHandle, path: &str, count: usize, failing: usize) -> Vec<u16> {
    futures::stream::iter(0..count)
        .map(|i| {
            let mut request = http::Request::get(gateway.url(path));
            if i < failing {
                request = request.header("x-echo-status", "500");
            }
            let request = request.body(Full::new(Bytes::new())).unwrap();
            async move {
                testenv::http_client::send(request, Duration::from_secs(60))
                    .await
                    .map(|a| a.status)
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

/// A Grafana query with the dashboard's variables set as a user picking
/// this app would (all routes), and `$__rate_interval` as 5m.
fn grafana_to_promql(expr: &str, namespace: &str) -> String {
    expr.replace("$namespace", namespace)
        .replace("$app", "obs")
        .replace("$route", ".*")
        .replace("$__rate_interval", "5m")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_tandem_evaluates_its_rules_fires_its_alerts_and_answers_the_dashboard()
{
    install_crd().await;
    let ns = TestNamespace::create("obs").await;
    let operator = OperatorProcess::start(
        &ns.name,
        &operator_kubeconfig(&ns.name).await,
        "op-1",
        &["--log-format=json"],
    )
    .await;
    let template = |name: &str, delay_ms: &str| {
        json!({"spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": name, "image": "example/echo:1",
            "env": [{"name": "ECHO_STARTUP_DELAY_MS", "value": delay_ms}],
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}})
    };
    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "obs"},
        "spec": {
            "workloads": [
                {"name": "web", "mode": "AlwaysOn", "port": 8080, "template": template("web", "0"),
                 "scaling": {"minReplicas": 1, "maxReplicas": 2}},
                {"name": "fn", "mode": "Function", "port": 8080, "template": template("fn", "600"),
                 "scaling": {"scaleToZeroAfter": "10s", "targetConcurrency": 100}},
            ],
            "routes": [
                {"name": "thumbs", "match": {"pathPrefix": "/thumb"}, "backends": [{"workload": "fn"}]},
                {"name": "split", "match": {"pathPrefix": "/"},
                 "backends": [{"workload": "web", "weight": 80}, {"workload": "fn", "weight": 20}],
                 "migration": {"steps": [50, 100], "stepInterval": "60s"}},
            ]
        }
    }))
    .unwrap();
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let gateway = GatewayHandle::for_operator("obs", &ns.name, &operator).await;
    let dir = testenv::environment()
        .control_plane
        .dir
        .join(format!("prometheus-{}", ns.name));
    let prometheus = Prometheus::start(
        &dir,
        &[
            ("tandem-operator", operator.admin),
            ("tandem-gateway", gateway.admin()),
        ],
    )
    .await;
    let deployments: Api<Deployment> = ns.api();
    let replicas = |name: &'static str| {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get(name).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((
                d.spec.and_then(|s| s.replicas).unwrap_or(-1),
                d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
            ))
        }
    };
    wait_for(
        "web ready and fn at zero",
        Duration::from_secs(60),
        || async {
            match (replicas("obs-web").await?, replicas("obs-fn").await?) {
                ((1, 1), (0, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let sel = format!(r#"namespace="{}",app="obs""#, ns.name);

    // Both targets are up and scraped.
    for job in ["tandem-operator", "tandem-gateway"] {
        prometheus
            .wait_value(
                &format!("{job} to be up"),
                &format!(r#"up{{job="{job}"}}"#),
                |v| v == 1.0,
            )
            .await;
    }

    // A cold start: the held request is answered, the wait is observed.
    let cold = send(&gateway, "/thumb/cold", 1, 0).await;
    assert_eq!(cold, [200]);
    let waited = prometheus
        .wait_value(
            "the cold wait's sample",
            &format!(r#"tandem_gateway_cold_wait_seconds_sum{{{sel},workload="fn"}}"#),
            |v| v > 0.0,
        )
        .await;
    assert!(
        waited >= 0.5,
        "the function takes 600 ms to start: {waited}"
    );
    let count = prometheus
        .value(&format!(
            r#"tandem_gateway_cold_wait_seconds_count{{{sel},workload="fn"}}"#
        ))
        .await
        .unwrap();
    assert_eq!(count, 1.0);
    let starts = prometheus
        .value(&format!(
            r#"tandem_gateway_cold_starts_total{{{sel},workload="fn"}}"#
        ))
        .await
        .unwrap();
    assert_eq!(starts, 1.0);

    // Warm-up: both workloads of the split have a series in Prometheus
    // before the measured traffic, so rates count all of it.
    assert!(send(&gateway, "/", 10, 0).await.iter().all(|s| *s == 200));
    prometheus
        .wait_value(
            "both series of the split",
            &format!(r#"count(tandem_gateway_requests_total{{{sel},route="split"}})"#),
            |v| v == 2.0,
        )
        .await;
    // 20 more, counted in the rates from here on. No 5xx yet: the split's
    // error ratio is 0, the 5xx alert is evaluated and inactive, and so
    // is the missing-leader alert (the operator leads).
    assert!(send(&gateway, "/", 20, 0).await.iter().all(|s| *s == 200));
    prometheus
        .wait_value(
            "the 20 scraped",
            &format!(r#"sum(tandem_gateway_requests_total{{{sel},route="split"}})"#),
            |v| v == 30.0,
        )
        .await;
    prometheus
        .wait_value(
            "the split's error ratio recorded",
            &format!(r#"tandem:route_errors:ratio_rate5m{{{sel},route="split"}}"#),
            |v| v == 0.0,
        )
        .await;
    assert_eq!(
        prometheus
            .alert("TandemGateway5xxRatioHigh")
            .await
            .unwrap()
            .0,
        "inactive"
    );
    prometheus
        .wait_value("the leader gauge", r#"max(tandem_operator_leader)"#, |v| {
            v == 1.0
        })
        .await;
    assert_eq!(
        prometheus.alert("TandemLeaderMissing").await.unwrap().0,
        "inactive"
    );
    // One failure, so the 500 series exists before the measured ones.
    assert_eq!(send(&gateway, "/thumb/x", 1, 1).await, [500]);
    prometheus
        .wait_value(
            "the 500 series",
            &format!(r#"tandem_gateway_requests_total{{{sel},route="thumbs",code="500"}}"#),
            |v| v == 1.0,
        )
        .await;

    // Measured: 400 requests on the split, 100 on thumbs of which 50 fail.
    let split = send(&gateway, "/page", 400, 0).await;
    assert!(split.iter().all(|s| *s == 200), "{split:?}");
    let thumbs = send(&gateway, "/thumb/m", 100, 50).await;
    assert_eq!(thumbs.iter().filter(|s| **s == 500).count(), 50);
    assert_eq!(thumbs.iter().filter(|s| **s == 200).count(), 50);
    prometheus
        .wait_value(
            "every split request scraped",
            &format!(r#"sum(tandem_gateway_requests_total{{{sel},route="split"}})"#),
            |v| v == 430.0,
        )
        .await;
    prometheus
        .wait_value(
            "every thumbs request scraped",
            &format!(r#"sum(tandem_gateway_requests_total{{{sel},route="thumbs"}})"#),
            |v| v == 102.0,
        )
        .await;
    // The recording rules, once evaluated after that scrape: the rate over
    // 5m covers the 420 requests after the series' first samples
    // (Prometheus extrapolates by at most a scrape interval past the
    // last sample, and not below zero before the first), the
    // split's shares are its weights, thumbs answered half 5xx.
    let recorded = |rule: &str, labels: &str| format!("{rule}{{{sel},{labels}}}");
    // (The extrapolation past the last sample shrinks as the series gets
    // longer, so the rate converges on 420 / 300 s.)
    prometheus
        .wait_value(
            "the split's request rate, 420 per 5m",
            &format!(
                "{} * 300",
                recorded("tandem:route_requests:rate5m", r#"route="split""#)
            ),
            |v| (418.0..=440.0).contains(&v),
        )
        .await;
    prometheus
        .wait_value(
            "web's share of the split, its weight 80%",
            &recorded(
                "tandem:route_workload_share:ratio_rate5m",
                r#"route="split",workload="web""#,
            ),
            |v| (v - 0.8).abs() <= 0.03,
        )
        .await;
    prometheus
        .wait_value(
            "thumbs' 5xx ratio, half",
            &recorded("tandem:route_errors:ratio_rate5m", r#"route="thumbs""#),
            |v| (v - 0.5).abs() <= 0.03,
        )
        .await;
    let latency = prometheus
        .value(&recorded(
            "tandem:workload_latency_seconds:p99_5m",
            r#"workload="web""#,
        ))
        .await
        .unwrap();
    assert!(latency > 0.0 && latency < 5.0, "web p99 {latency}");

    // 50 of the app's ~530 requests are 5xx (> 5%): the alert fires, with
    // its summary rendered for this app.
    let firing = prometheus
        .wait_alert("TandemGateway5xxRatioHigh", "firing")
        .await;
    let ours: Vec<&Value> = firing
        .iter()
        .filter(|a| a["labels"]["app"] == "obs" && a["labels"]["namespace"] == ns.name.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{firing:?}");
    let summary = ours[0]["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("{}/obs: ", ns.name)) && summary.contains('%'),
        "{summary}"
    );

    // A second cold start, now that the histogram's series exist: the p99
    // cold wait rule has a value (the function starts in 600 ms).
    wait_for("fn back at zero", Duration::from_secs(60), || async {
        match replicas("obs-fn").await? {
            (0, 0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(send(&gateway, "/thumb/cold-again", 1, 0).await, [200]);
    let p99 = prometheus
        .wait_value(
            "the p99 cold wait recorded",
            &recorded(
                "tandem:workload_cold_wait_seconds:p99_5m",
                r#"workload="fn""#,
            ),
            |v| v > 0.0,
        )
        .await;
    assert!((0.5..=30.0).contains(&p99), "p99 cold wait {p99}");
    prometheus
        .wait_value(
            "the cold-start rate recorded",
            &recorded("tandem:workload_cold_starts:rate5m", r#"workload="fn""#),
            |v| v > 0.0,
        )
        .await;

    // A migration starts (the split moves to fn), so the dashboard's
    // migration panel has a route to show.
    let patch = json!({"spec": {"routes": [
        {"name": "thumbs", "match": {"pathPrefix": "/thumb"}, "backends": [{"workload": "fn"}]},
        {"name": "split", "match": {"pathPrefix": "/"},
         "backends": [{"workload": "web", "weight": 0}, {"workload": "fn", "weight": 100}],
         "migration": {"steps": [50, 100], "stepInterval": "60s"}},
    ]}});
    apps.patch("obs", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    prometheus
        .wait_value(
            "the migration's series",
            &format!(r#"tandem_route_migration_running{{{sel},route="split"}}"#),
            |v| v == 1.0,
        )
        .await;
    prometheus
        .wait_value(
            "the replica gauges",
            &format!(r#"tandem_workload_ready_replicas{{{sel},workload="web",mode="AlwaysOn"}}"#),
            |v| v == 1.0,
        )
        .await;

    // Every query of the dashboard parses and returns data for this app.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(files().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let promql = grafana_to_promql(expr, &ns.name);
            let title = panel["title"].as_str().unwrap();
            let result = wait_for(
                &format!("panel {title:?} to have data"),
                Duration::from_secs(30),
                || async {
                    let result = prometheus.query(&promql).await?;
                    if result.is_empty() {
                        Err(format!("{promql}: no data"))
                    } else {
                        Ok(result)
                    }
                },
            )
            .await;
            assert!(
                result.iter().all(|s| s["value"][1] != "NaN"),
                "panel {title:?}: {promql}: {result:?}"
            );
            queries += 1;
        }
    }
    assert!(queries >= 10, "{queries} queries");
    // Its variables: label_values(selector, label) lists this app.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {query}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = grafana_to_promql(selector.trim(), &ns.name);
        let values = prometheus
            .api(
                &format!("label/{}/values", label.trim()),
                &[("match[]", &selector)],
            )
            .await
            .unwrap_or_else(|e| panic!("variable {query}: {e}"));
        let wanted = match label.trim() {
            "namespace" => ns.name.clone(),
            "app" => "obs".to_string(),
            _ => "split".to_string(),
        };
        assert!(
            values
                .as_array()
                .unwrap()
                .iter()
                .any(|v| *v == wanted.as_str()),
            "variable {query}: {values}"
        );
    }

    // JSON logs: every line an object; scaling lines name the namespace,
    // app and workload, and lines logged while reconciling carry the app
    // (and the route, for a migration's) in their spans.
    let log = operator.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ours = |l: &&Value, key: &str, value: &str| {
        l["fields"][key] == value
            || l["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s[key] == value))
    };
    let scaled: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["reason"] == "ScaledFromZero")
        .collect();
    assert!(
        scaled.iter().any(|l| ours(l, "namespace", &ns.name)
            && ours(l, "app", "obs")
            && ours(l, "workload", "fn")),
        "no ScaledFromZero line naming the workload: {scaled:?}"
    );
    let started: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["reason"] == "MigrationStarted")
        .collect();
    assert!(
        started.iter().any(|l| ours(l, "namespace", &ns.name)
            && ours(l, "app", "obs")
            && ours(l, "route", "split")),
        "no MigrationStarted line naming the route: {started:?}"
    );

    // The operator dies: no leader, and the alert fires.
    operator.kill().await;
    prometheus.wait_alert("TandemLeaderMissing", "firing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trace_export_each_reconcile_is_a_span_at_the_collector() {
    install_crd().await;
    let ns = TestNamespace::create("otlp").await;
    let receiver = crate::support::OtlpReceiver::start().await;
    let endpoint = format!("--otlp-endpoint={}", receiver.url);
    let _operator = OperatorProcess::start(
        &ns.name,
        &operator_kubeconfig(&ns.name).await,
        "op-1",
        &[&endpoint],
    )
    .await;
    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "traced"},
        "spec": {
            "workloads": [{"name": "web", "mode": "AlwaysOn", "port": 8080,
                "template": {"spec": {"containers": [{"name": "web", "image": "example/echo:1"}]}}}],
            "routes": [{"name": "all", "match": {"pathPrefix": "/"}, "backends": [{"workload": "web"}]}]
        }
    }))
    .unwrap();
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let span = receiver
        .wait_span("a reconcile span of the app", |s| {
            s.name == "reconcile"
                && s.attributes.get("namespace") == Some(&ns.name)
                && s.attributes.get("app").map(String::as_str) == Some("traced")
        })
        .await;
    assert_eq!(span.service, "tandem-operator", "{span:?}");
    assert_eq!(span.parent_span_id, "", "a trace of its own: {span:?}");
    assert_eq!(span.trace_id.len(), 32);
    assert_eq!(
        span.attributes.get("generation").map(String::as_str),
        Some("1"),
        "{span:?}"
    );
    assert_ne!(span.status, 2, "a reconcile that worked: {span:?}");
}
