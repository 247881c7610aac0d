//! Shared helpers of the integration tests.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use tandem::api::HybridApp;
use testenv::{environment, wait_for};
use tokio::sync::OnceCell;

/// Lines of a Tandem log where the API server refused a request (kube
/// reports `... is forbidden: ...` with `code: 403`).
pub fn refusals(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("code: 403") || l.to_lowercase().contains("forbidden"))
        .collect()
}

/// Installs the HybridApp CRD once per test binary and waits until it is served.
/// Installs the Gateway API CRDs (standard channel) once per test binary
/// and waits until HTTPRoutes can be listed.
pub async fn install_gateway_api() {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let client = environment().client().await;
            testenv::gateway_api::install(&client)
                .await
                .expect("the Gateway API CRDs install");
            let routes: Api<tandem::controller::httproute::HttpRoute> = Api::all(client);
            wait_for(
                "httproutes to be listable",
                std::time::Duration::from_secs(30),
                || async {
                    routes
                        .list(&Default::default())
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                },
            )
            .await;
        })
        .await;
}

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
            testenv::wait_for_crd(&client, &name, std::time::Duration::from_secs(30)).await;
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

/// A `tandem operator` process running under a ServiceAccount bound to
/// exactly the RBAC in `charts/tandem/files/operator-rbac.yaml`, watching one
/// namespace (so tests do not see each other's apps).
pub struct OperatorProcess {
    /// The process.
    pub process: testenv::process::ChildProcess,
    /// Its /healthz, /readyz and /metrics address.
    pub admin: std::net::SocketAddr,
    /// Its log file.
    pub log: std::path::PathBuf,
    /// Where gateways send demand and stats.
    pub autoscaler: std::net::SocketAddr,
    /// Its identity in the Lease.
    pub identity: String,
}

/// RBAC rules of the operator, as the chart will render them.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperatorRbac {
    cluster_rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>,
    namespace_rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>,
}

/// Creates the operator's ServiceAccount and its RBAC in `namespace` and
/// returns a kubeconfig file with a token of that account.
pub async fn operator_kubeconfig(namespace: &str) -> std::path::PathBuf {
    account_kubeconfig(namespace, "tandem-operator", "operator-rbac.yaml").await
}

/// Creates ServiceAccount `account` in `namespace`, bound to exactly the
/// rules in `charts/tandem/files/<rbac_file>`, and returns a kubeconfig file
/// with a token of that account.
pub async fn account_kubeconfig(
    namespace: &str,
    account: &str,
    rbac_file: &str,
) -> std::path::PathBuf {
    account_kubeconfig_with(namespace, account, &[rbac_file]).await
}

/// [`account_kubeconfig`] bound to the rules of several files together.
pub async fn account_kubeconfig_with(
    namespace: &str,
    account: &str,
    rbac_files: &[&str],
) -> std::path::PathBuf {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::api::PostParams;
    let env = environment();
    let client = env.client().await;
    let mut rbac = OperatorRbac {
        cluster_rules: Vec::new(),
        namespace_rules: Vec::new(),
    };
    for file in rbac_files {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/tandem/files")
            .join(file);
        let more: OperatorRbac =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        rbac.cluster_rules.extend(more.cluster_rules);
        rbac.namespace_rules.extend(more.namespace_rules);
    }
    let pp = PostParams::default();
    let subject =
        serde_json::json!([{"kind": "ServiceAccount", "name": account, "namespace": namespace}]);
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": account}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&pp, &sa)
        .await
        .unwrap();
    let cluster_role_name = format!("{account}-{namespace}");
    let mut cluster_role: ClusterRole =
        serde_json::from_value(serde_json::json!({"metadata": {"name": cluster_role_name}}))
            .unwrap();
    cluster_role.rules = Some(rbac.cluster_rules);
    Api::<ClusterRole>::all(client.clone())
        .create(&pp, &cluster_role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": cluster_role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role_name},
        "subjects": subject,
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&pp, &binding)
        .await
        .unwrap();
    let mut role: Role =
        serde_json::from_value(serde_json::json!({"metadata": {"name": account}})).unwrap();
    role.rules = Some(rbac.namespace_rules);
    Api::<Role>::namespaced(client.clone(), namespace)
        .create(&pp, &role)
        .await
        .unwrap();
    let role_binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": account},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": subject,
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&pp, &role_binding)
        .await
        .unwrap();

    let token = testenv::service_account_token(&client, namespace, account, 3600)
        .await
        .unwrap();
    let kubeconfig = env.control_plane.kubeconfig_for(
        &format!("system:serviceaccount:{namespace}:{account}"),
        &token,
        namespace,
    );
    let file = env
        .control_plane
        .dir
        .join(format!("{account}-{namespace}.kubeconfig"));
    std::fs::write(&file, kubeconfig).unwrap();
    file
}

impl OperatorProcess {
    /// Starts `tandem operator` for `namespace` and waits until /readyz is ok.
    pub async fn start(
        namespace: &str,
        kubeconfig: &std::path::Path,
        identity: &str,
        extra: &[&str],
    ) -> Self {
        Self::start_at(namespace, kubeconfig, identity, extra, None).await
    }

    /// Like [`OperatorProcess::start`], with a given autoscaler address (a
    /// restarted operator keeps the address its gateways know).
    pub async fn start_at(
        namespace: &str,
        kubeconfig: &std::path::Path,
        identity: &str,
        extra: &[&str],
        autoscaler: Option<std::net::SocketAddr>,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let autoscaler_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let autoscaler: std::net::SocketAddr =
            autoscaler.unwrap_or(([127, 0, 0, 1], autoscaler_port).into());
        let log = environment()
            .control_plane
            .dir
            .join("logs")
            .join(format!("operator-{namespace}-{identity}.log"));
        let mut args = vec![
            "operator".to_string(),
            format!("--watch-namespace={namespace}"),
            format!("--lease-namespace={namespace}"),
            format!("--admin-address={admin}"),
            format!("--autoscaler-address={autoscaler}"),
            format!("--identity={identity}"),
        ];
        if !extra.iter().any(|a| a.starts_with("--lease-duration")) {
            args.push("--lease-duration=6s".to_string());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let spec = testenv::process::ProcessSpec {
            program: env!("CARGO_BIN_EXE_tandem").into(),
            args,
            env: vec![
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                ("RUST_LOG".into(), "info,tandem=debug".into()),
            ],
            log: log.clone(),
            netns: None,
        };
        let process = testenv::process::spawn(spec).unwrap();
        let operator = Self {
            process,
            admin,
            autoscaler,
            log,
            identity: identity.into(),
        };
        wait_for(
            "the operator to answer /healthz",
            std::time::Duration::from_secs(30),
            || async {
                if !operator.process.is_running() {
                    panic!("the operator exited:\n{}", operator.log_text());
                }
                operator.get("/healthz").await.map(drop)
            },
        )
        .await;
        operator
    }

    /// `GET path` on the admin endpoint: the body if it answered 200.
    pub async fn get(&self, path: &str) -> Result<String, String> {
        let answer = testenv::http_client::get(&format!("http://{}{path}", self.admin))
            .await
            .map_err(|e| e.to_string())?;
        if answer.status == 200 {
            Ok(answer.body)
        } else {
            Err(format!("{}: {}", answer.status, answer.body))
        }
    }

    /// Waits until /readyz is ok (the leader has synced its watches).
    pub async fn wait_ready(&self) {
        wait_for(
            "the operator to be ready",
            std::time::Duration::from_secs(30),
            || self.get("/readyz"),
        )
        .await;
    }

    /// Total writes the operator made, from its metrics.
    pub async fn writes(&self) -> u64 {
        let metrics = self.get("/metrics").await.unwrap_or_default();
        metrics
            .lines()
            .filter(|l| l.starts_with("tandem_writes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the operator ever got a 403 from the API server.
    pub fn assert_never_forbidden(&self) {
        let log = self.log_text();
        let forbidden = refusals(&log);
        assert!(
            forbidden.is_empty(),
            "the operator was refused by RBAC:\n{}",
            forbidden.join("\n")
        );
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&self) {
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
        self.process.wait().await;
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// The health helper (`testenv/health`), built once.
pub fn health_helper() -> std::path::PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../testenv/health/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run testenv/health/build.sh");
    assert!(
        out.status.success(),
        "build the health helper: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap();
    std::path::PathBuf::from(path.trim())
}

/// What kstatus and Argo CD's health check (docs/argocd-health.lua) say of
/// `app`: (status, message) each.
pub fn health(helper: &std::path::Path, app: &HybridApp) -> ((String, String), (String, String)) {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd-health.lua");
    let mut child = std::process::Command::new(helper)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the health helper");
    let object = serde_json::to_vec(app).unwrap();
    child.stdin.take().unwrap().write_all(&object).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pair = |tool: &str| {
        (
            verdict[tool]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            verdict[tool]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    (pair("kstatus"), pair("argocd"))
}

/// Serves HTTP/1 on `listener` in the background (a fake peer of a test):
/// every request is answered by `answer`.
pub fn serve_http1<F, Fut>(listener: tokio::net::TcpListener, answer: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let answered = answer(request);
                    async move { Ok::<_, std::convert::Infallible>(answered.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// One span an [`OtlpReceiver`] got.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// Span name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent_span_id: String,
    /// OTLP span kind (2: server).
    pub kind: i32,
    /// OTLP status code (2: error).
    pub status: i32,
    /// Attributes, their values as text.
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// A local OTLP/HTTP collector: answers `POST /v1/traces` (protobuf) and
/// keeps every span it decodes.
pub struct OtlpReceiver {
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    /// Starts it on a free loopback port.
    pub async fn start() -> Self {
        use http_body_util::BodyExt;
        use prost::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = spans.clone();
        serve_http1(listener, move |request| {
            let kept = kept.clone();
            async move {
                let good = request.method() == hyper::Method::POST
                    && request.uri().path() == "/v1/traces"
                    && request
                        .headers()
                        .get("content-type")
                        .is_some_and(|c| c == "application/x-protobuf");
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
                let status = match (good, ExportTraceServiceRequest::decode(body)) {
                    (true, Ok(export)) => {
                        kept.lock().unwrap().extend(received_spans(export));
                        200
                    }
                    _ => 400,
                };
                hyper::Response::builder()
                    .status(status)
                    .header("content-type", "application/x-protobuf")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap()
            }
        });
        OtlpReceiver { url, spans }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (at most 30 s) for a span that `wanted` accepts.
    pub async fn wait_span(
        &self,
        what: &str,
        wanted: impl Fn(&ReceivedSpan) -> bool,
    ) -> ReceivedSpan {
        let wanted = &wanted;
        wait_for(what, std::time::Duration::from_secs(30), || async move {
            let spans = self.spans();
            spans.iter().find(|s| wanted(s)).cloned().ok_or_else(|| {
                format!(
                    "{} spans: {:?}",
                    spans.len(),
                    spans.iter().rev().take(5).collect::<Vec<_>>()
                )
            })
        })
        .await
    }
}

fn received_spans(
    export: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Vec<ReceivedSpan> {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    fn text(value: &Option<AnyValue>) -> String {
        match value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        }
    }
    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
    fn attributes(list: &[KeyValue]) -> std::collections::BTreeMap<String, String> {
        list.iter()
            .map(|kv| (kv.key.clone(), text(&kv.value)))
            .collect()
    }
    let mut spans = Vec::new();
    for resource in export.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    status: span.status.as_ref().map_or(0, |s| s.code),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    spans
}
