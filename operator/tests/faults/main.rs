//! The operator and the gateway under faults, on a control plane of this
//! binary's own: audit log on (every write, by whom and when), the watch
//! cache off and etcd compacted every 5 s (so a watch resumed from an old
//! resourceVersion gets 410 Gone). The faults stop the API server, compact
//! under watches, cut a leader off, fight over a child's fields and delete
//! apps; they run one at a time, as they share the control plane.
//!
//! Operators run the way a Deployment runs them: a process that exits is
//! started again (as the kubelet would), under the same identity.

#[allow(dead_code)]
#[path = "../integration/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::{OperatorProcess, account_kubeconfig, install_crd};
use tandem::api::HybridApp;
use testenv::forwarder::Forwarder;
use testenv::process::{ChildProcess, ProcessSpec, spawn};
use testenv::{TestNamespace, wait_for};

/// One fault at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This binary's control plane (configured before its first use).
fn environment() -> &'static testenv::Environment {
    testenv::harness::configure(testenv::controlplane::Options {
        audit_log: true,
        apiserver_args: vec![
            "--watch-cache=false".into(),
            "--etcd-compaction-interval=5s".into(),
        ],
    });
    testenv::environment()
}

use testenv::free_loopback_port as free_port;

/// How many objects `api` lists.
async fn count<K>(api: &Api<K>) -> Result<usize, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default())
        .await
        .map(|list| list.items.len())
        .map_err(|e| e.to_string())
}

fn dir(name: &str) -> PathBuf {
    let dir = environment().control_plane.dir.join("faults").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An operator process that is started again when it exits, like a
/// container under a kubelet.
struct Operator {
    current: Arc<Mutex<Option<OperatorProcess>>>,
    restarts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    identity: String,
    log: PathBuf,
    admin: Arc<Mutex<SocketAddr>>,
    autoscaler: SocketAddr,
}

impl Operator {
    async fn start(namespace: &str, kubeconfig: &Path, identity: &str, extra: &[&str]) -> Operator {
        let first = OperatorProcess::start(namespace, kubeconfig, identity, extra).await;
        let (log, autoscaler, admin) = (first.log.clone(), first.autoscaler, first.admin);
        let current = Arc::new(Mutex::new(Some(first)));
        let restarts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(Mutex::new(admin));
        let (namespace, kubeconfig, identity_owned, extra): (String, PathBuf, String, Vec<String>) = (
            namespace.into(),
            kubeconfig.into(),
            identity.into(),
            extra.iter().map(|s| s.to_string()).collect(),
        );
        {
            let (current, restarts, stop, admin) = (
                current.clone(),
                restarts.clone(),
                stop.clone(),
                admin.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let exited = current
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|p| !p.process.is_running());
                    if exited && !stop.load(Ordering::SeqCst) {
                        // Restarted at once (a kubelet backs off; no need here).
                        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                        let next = OperatorProcess::start_at(
                            &namespace,
                            &kubeconfig,
                            &identity_owned,
                            &extra,
                            Some(autoscaler),
                        )
                        .await;
                        *admin.lock().unwrap() = next.admin;
                        *current.lock().unwrap() = Some(next);
                        restarts.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        Operator {
            current,
            restarts,
            stop,
            identity: identity.into(),
            log,
            admin,
            autoscaler,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn restarts(&self) -> usize {
        self.restarts.load(Ordering::SeqCst)
    }

    fn running(&self) -> bool {
        self.current
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|p| p.process.is_running())
    }

    async fn metrics(&self) -> String {
        let admin = *self.admin.lock().unwrap();
        testenv::http_client::get(&format!("http://{admin}/metrics"))
            .await
            .map(|a| a.body)
            .unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.current.lock().unwrap().take();
    }
}

/// A `tandem gateway` process on routes from the API server.
struct Gateway {
    process: ChildProcess,
    addr: SocketAddr,
    log: PathBuf,
}

impl Gateway {
    async fn start(
        dir: &Path,
        kubeconfig: &Path,
        namespace: &str,
        operators: &[SocketAddr],
    ) -> Gateway {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = dir.join("gateway.log");
        let urls: Vec<String> = operators.iter().map(|a| format!("http://{a}")).collect();
        let process = spawn(ProcessSpec {
            program: env!("CARGO_BIN_EXE_tandem").into(),
            args: vec![
                "gateway".into(),
                format!("--listen={addr}"),
                format!("--admin-address={admin}"),
                format!("--namespace={namespace}"),
                format!("--operator-url={}", urls.join(",")),
                "--id=gw-faults".into(),
            ],
            env: vec![
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                ("RUST_LOG".into(), "info,tandem=debug".into()),
            ],
            log: log.clone(),
            netns: None,
        })
        .unwrap();
        let gateway = Gateway { process, addr, log };
        wait_for(
            "the gateway to be ready",
            Duration::from_secs(30),
            || async {
                assert!(
                    gateway.process.is_running(),
                    "gateway exited:\n{}",
                    gateway.log_text()
                );
                match testenv::http_client::get(&format!("http://{admin}/readyz")).await {
                    Ok(answer) if answer.status == 200 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        gateway
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Result<testenv::http_client::Answer, String> {
        let request = http::Request::get(format!("http://{}{path}", self.addr))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        testenv::http_client::send(request, Duration::from_secs(20))
            .await
            .map_err(|e| format!("{e:#}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

fn workload(name: &str, mode: &str, extra: Value) -> Value {
    let mut w = json!({"name": name, "mode": mode, "port": 8080,
        "template": {"spec": {"containers": [{"name": "c", "image": "example/echo:1"}]}}});
    if let (Value::Object(w), Value::Object(extra)) = (&mut w, extra) {
        w.extend(extra);
    }
    w
}

fn app(name: &str, workloads: Vec<Value>, routes: Value) -> HybridApp {
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": name},
        "spec": {"workloads": workloads, "routes": routes},
    }))
    .unwrap()
}

async fn apply(apps: &Api<HybridApp>, app: &HybridApp) {
    let name = app.metadata.name.clone().unwrap();
    apps.patch(
        &name,
        &PatchParams::apply("faults-test").force(),
        &Patch::Apply(app),
    )
    .await
    .unwrap();
}

/// Waits until `name` is Ready for its latest generation.
async fn wait_ready(apps: &Api<HybridApp>, name: &str, within: Duration) {
    wait_for(&format!("{name} to be Ready"), within, || async {
        let app = apps.get(name).await.map_err(|e| e.to_string())?;
        let status = app.status.as_ref().ok_or("no status")?;
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready && status.observed_generation == app.metadata.generation {
            Ok(())
        } else {
            Err(format!("{:?}", status.conditions))
        }
    })
    .await;
}

/// The successful writes (create, update, patch, delete) of the audit log,
/// by user, in the order the API server finished them.
#[derive(Debug, Clone)]
struct Write {
    user: String,
    resource: String,
    name: String,
    received: k8s_openapi::jiff::Timestamp,
    completed: k8s_openapi::jiff::Timestamp,
}

fn writes_in(namespace: &str) -> Vec<Write> {
    let text = std::fs::read_to_string(environment().control_plane.audit_log()).unwrap_or_default();
    let mut writes: Vec<Write> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| {
            matches!(
                e["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete")
            )
        })
        .filter(|e| {
            e["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|c| (200..300).contains(&c))
        })
        .filter(|e| e["objectRef"]["namespace"] == namespace)
        .filter_map(|e| {
            Some(Write {
                user: e["user"]["username"].as_str()?.to_string(),
                resource: e["objectRef"]["resource"].as_str()?.to_string(),
                name: e["objectRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                received: e["requestReceivedTimestamp"].as_str()?.parse().ok()?,
                completed: e["stageTimestamp"].as_str()?.parse().ok()?,
            })
        })
        .collect();
    writes.sort_by_key(|w| w.completed);
    writes
}

/// The operator's users (`system:serviceaccount:<ns>:tandem-operator-...`).
fn is_operator(user: &str) -> bool {
    user.contains(":tandem-operator")
}

/// Runs of writes by one operator user: a new run starts whenever another
/// operator wrote in between. With one leader at a time, there is one run
/// per leadership.
fn leadership_runs(writes: &[Write]) -> Vec<(String, Write, Write)> {
    let mut runs: Vec<(String, Write, Write)> = Vec::new();
    for write in writes.iter().filter(|w| is_operator(&w.user)) {
        match runs.last_mut() {
            Some((user, _, last)) if *user == write.user => *last = write.clone(),
            _ => runs.push((write.user.clone(), write.clone(), write.clone())),
        }
    }
    runs
}

fn acquisitions(operators: &[&Operator]) -> usize {
    operators
        .iter()
        .map(|o| o.log_text().matches("acquired the lease; leading").count())
        .sum()
}

/// Panics that happened in a log.
fn panics(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("panicked")).collect()
}

/// Two operator replicas (each its own ServiceAccount) and a gateway, all
/// in `ns`, with an app `shop`: an AlwaysOn `web` and a Function `fn`.
async fn two_operators_and_a_gateway(
    ns: &TestNamespace,
    dir: &Path,
) -> (Operator, Operator, Gateway, Api<HybridApp>) {
    install_crd().await;
    let a = account_kubeconfig(&ns.name, "tandem-operator-a", "operator-rbac.yaml").await;
    let b = account_kubeconfig(&ns.name, "tandem-operator-b", "operator-rbac.yaml").await;
    let op_a = Operator::start(&ns.name, &a, "op-a", &[]).await;
    let op_b = Operator::start(&ns.name, &b, "op-b", &[]).await;
    let gw = account_kubeconfig(&ns.name, "tandem-gateway", "gateway-rbac.yaml").await;
    let gateway = Gateway::start(dir, &gw, &ns.name, &[op_a.autoscaler, op_b.autoscaler]).await;
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    let routes = json!([
        {"name": "web", "match": {"pathPrefix": "/web"}, "backends": [{"workload": "web"}]},
        {"name": "fn", "match": {"pathPrefix": "/fn"}, "backends": [{"workload": "fn"}]}
    ]);
    apply(
        &apps,
        &app(
            "shop",
            vec![
                workload("web", "AlwaysOn", json!({})),
                workload(
                    "fn",
                    "Function",
                    json!({"scaling": {"scaleToZeroAfter": "10m"}}),
                ),
            ],
            routes,
        ),
    )
    .await;
    wait_ready(&apps, "shop", Duration::from_secs(60)).await;
    // Wake the Function and wait until both routes answer.
    for path in ["/web/warm", "/fn/warm"] {
        wait_for(
            &format!("{path} through the gateway"),
            Duration::from_secs(60),
            || async {
                match gateway.get(path).await {
                    Ok(answer) if answer.status == 200 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    (op_a, op_b, gateway, apps)
}

/// Requests every 25 ms to both routes until stopped; every answer counted.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<String, usize>>,
}

impl Traffic {
    fn start(gateway: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let mut outcomes = BTreeMap::new();
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let path = if i.is_multiple_of(2) {
                    "/web/t"
                } else {
                    "/fn/t"
                };
                i += 1;
                let request = http::Request::get(format!("http://{gateway}{path}/{i}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let outcome =
                    match tokio::time::timeout(Duration::from_secs(10), client.request(request))
                        .await
                    {
                        Ok(Ok(response)) => response.status().as_u16().to_string(),
                        Ok(Err(error)) => format!("error: {error}"),
                        Err(_) => "timeout".to_string(),
                    };
                *outcomes.entry(outcome).or_insert(0) += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            outcomes
        });
        Traffic { stop, task }
    }

    async fn stop(self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_stopped_for_30s_leaves_warm_traffic_answered_and_one_leader_at_a_time() {
    let _serial = SERIAL.lock().await;
    let env = environment();
    let ns = TestNamespace::create("outage").await;
    let dir = dir("outage");
    let (op_a, op_b, gateway, apps) = two_operators_and_a_gateway(&ns, &dir).await;
    let traffic = Traffic::start(gateway.addr);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let apiserver = env
        .control_plane
        .pids()
        .into_iter()
        .find(|(name, _)| *name == "kube-apiserver")
        .expect("the API server")
        .1;
    let stop = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(apiserver as i32),
        nix::sys::signal::Signal::SIGSTOP,
    );
    stop.expect("SIGSTOP the API server");
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(apiserver as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT the API server");
    let resumed_at = Instant::now();

    // Converged within 60 s: a change made now is reconciled and routed.
    let routes = json!([
        {"name": "web", "match": {"pathPrefix": "/web"}, "backends": [{"workload": "web"}]},
        {"name": "fn", "match": {"pathPrefix": "/fn"}, "backends": [{"workload": "fn"}]},
        {"name": "after", "match": {"pathPrefix": "/after"}, "backends": [{"workload": "web"}]}
    ]);
    wait_for(
        "the API server to answer again",
        Duration::from_secs(30),
        || async { apps.get("shop").await.map(drop).map_err(|e| e.to_string()) },
    )
    .await;
    apply(
        &apps,
        &app(
            "shop",
            vec![
                workload("web", "AlwaysOn", json!({})),
                workload(
                    "fn",
                    "Function",
                    json!({"scaling": {"scaleToZeroAfter": "10m"}}),
                ),
            ],
            routes,
        ),
    )
    .await;
    wait_ready(&apps, "shop", Duration::from_secs(60)).await;
    wait_for(
        "the new route through the gateway",
        Duration::from_secs(60),
        || async {
            match gateway.get("/after/x").await {
                Ok(answer) if answer.status == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let converged = resumed_at.elapsed();
    let outcomes = traffic.stop().await;
    eprintln!(
        "outage: stopped {:?}, converged {converged:?} after SIGCONT; traffic {outcomes:?}; operator restarts a={} b={}",
        resumed_at - stopped_at,
        op_a.restarts(),
        op_b.restarts()
    );
    assert!(converged < Duration::from_secs(60), "{converged:?}");
    let failed: usize = outcomes
        .iter()
        .filter(|(k, _)| *k != "200")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        failed, 0,
        "warm requests failed during the outage: {outcomes:?}"
    );
    assert!(
        outcomes.get("200").copied().unwrap_or(0) > 500,
        "{outcomes:?}"
    );

    // Nothing crashed: the gateway ran throughout; an operator exited only
    // because it could not renew its lease (by design), and was restarted.
    assert!(gateway.process.is_running());
    for operator in [&op_a, &op_b] {
        let log = operator.log_text();
        assert!(
            panics(&log).is_empty(),
            "{}:\n{}",
            operator.identity,
            panics(&log).join("\n")
        );
        let exits = log.matches("lost the leader lease; exiting").count();
        assert_eq!(
            exits,
            operator.restarts(),
            "{}: every exit is a lost lease",
            operator.identity
        );
    }
    assert!(panics(&gateway.log_text()).is_empty());
    assert!(op_a.running() && op_b.running());

    // One leader at a time: the operators' writes form one run per
    // leadership, never interleaved.
    let writes = writes_in(&ns.name);
    let runs = leadership_runs(&writes);
    let leaderships = acquisitions(&[&op_a, &op_b]);
    eprintln!(
        "outage: {} operator writes, {} runs, {leaderships} leaderships",
        writes.iter().filter(|w| is_operator(&w.user)).count(),
        runs.len()
    );
    assert!(!runs.is_empty());
    assert!(
        runs.len() <= leaderships,
        "writes of two leaders interleaved: {:?}",
        runs.iter()
            .map(|(u, f, l)| (u, f.completed, l.completed))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_stops_writing_before_the_standby_takes_over() {
    let _serial = SERIAL.lock().await;
    let env = environment();
    install_crd().await;
    let ns = TestNamespace::create("partition").await;
    let dir = dir("partition");
    // Each operator reaches the API server through a forwarder of its own.
    let mut forwarders = Vec::new();
    let mut operators = Vec::new();
    for who in ["a", "b"] {
        let kubeconfig = account_kubeconfig(
            &ns.name,
            &format!("tandem-operator-{who}"),
            "operator-rbac.yaml",
        )
        .await;
        let forwarder = Forwarder::to_api_server(&env.control_plane).await;
        let through = forwarder.kubeconfig(&kubeconfig, &dir.join(format!("{who}.kubeconfig")));
        operators.push(Operator::start(&ns.name, &through, &format!("op-{who}"), &[]).await);
        forwarders.push(forwarder);
    }
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let holder = || async {
        leases
            .get("tandem-operator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default()
    };
    wait_for("a leader", Duration::from_secs(30), || async {
        if holder().await.is_empty() {
            Err("none".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    let leader = holder().await;
    let (lead, stand) = if leader == "op-a" { (0, 1) } else { (1, 0) };
    // The leader writes all the time: the app changes every 300 ms.
    let changing = {
        let apps = apps.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !flag.load(Ordering::SeqCst) {
                i += 1;
                let template = json!({"metadata": {"annotations": {"revision": i.to_string()}},
                                      "spec": {"containers": [{"name": "c", "image": "example/echo:1"}]}});
                let web =
                    json!({"name": "web", "mode": "AlwaysOn", "port": 8080, "template": template});
                let routes = json!([{"name": "web", "match": {"pathPrefix": "/"}, "backends": [{"workload": "web"}]}]);
                let _ = apps
                    .patch(
                        "moving",
                        &PatchParams::apply("faults-test").force(),
                        &Patch::Apply(&app("moving", vec![web], routes)),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        (stop, task)
    };
    tokio::time::sleep(Duration::from_secs(5)).await;

    forwarders[lead].cut();
    let cut_at = Instant::now();
    let standby = operators[stand].identity.clone();
    wait_for(
        "the standby to take over",
        Duration::from_secs(60),
        || async {
            if holder().await == standby {
                Ok(())
            } else {
                Err(holder().await)
            }
        },
    )
    .await;
    let took_over = cut_at.elapsed();
    // The new leader keeps reconciling the changes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    changing.0.store(true, Ordering::SeqCst);
    changing.1.await.unwrap();
    forwarders[lead].restore().await;

    let old = &operators[lead];
    let log = old.log_text();
    assert!(
        log.contains("could not renew the lease in time; writes stopped"),
        "{log}"
    );
    assert!(log.contains("lost the leader lease; exiting"), "{log}");

    let old_user = format!(
        "system:serviceaccount:{}:tandem-operator-{}",
        ns.name,
        ["a", "b"][lead]
    );
    let new_user = format!(
        "system:serviceaccount:{}:tandem-operator-{}",
        ns.name,
        ["a", "b"][stand]
    );
    let writes = writes_in(&ns.name);
    let last_old = writes
        .iter()
        .filter(|w| w.user == old_user)
        .map(|w| w.completed)
        .max()
        .unwrap();
    let last_old_renewal = writes
        .iter()
        .filter(|w| w.user == old_user && w.resource == "leases")
        .map(|w| w.received)
        .max()
        .unwrap();
    let first_new = writes
        .iter()
        .filter(|w| w.user == new_user)
        .map(|w| w.received)
        .min()
        .unwrap();
    let gap = first_new.duration_since(last_old);
    let after_renewal = first_new.duration_since(last_old_renewal);
    eprintln!(
        "partition: standby took over {took_over:?} after the cut; old leader's last write {last_old}, \
         new leader's first write {first_new} ({gap:#} later, {after_renewal:#} after the old leader's last renewal)"
    );
    assert!(
        gap.is_positive(),
        "the new leader wrote before the old one stopped"
    );
    // A candidate waits a whole lease duration (6 s here) after the last renewal.
    assert!(after_renewal.as_secs_f64() >= 6.0, "{after_renewal:#}");
    let runs = leadership_runs(&writes);
    assert_eq!(runs.len(), 2, "exactly one hand-over: {runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_watches_are_compacted_away_the_operator_and_the_gateway_relist_and_converge() {
    let _serial = SERIAL.lock().await;
    let env = environment();
    install_crd().await;
    let ns = TestNamespace::create("compact").await;
    let dir = dir("compact");
    let operator_config =
        account_kubeconfig(&ns.name, "tandem-operator-c", "operator-rbac.yaml").await;
    let gateway_config = account_kubeconfig(&ns.name, "tandem-gateway", "gateway-rbac.yaml").await;
    let mut operator_path = Forwarder::to_api_server(&env.control_plane).await;
    let mut gateway_path = Forwarder::to_api_server(&env.control_plane).await;
    let operator_config =
        operator_path.kubeconfig(&operator_config, &dir.join("operator.kubeconfig"));
    let gateway_config = gateway_path.kubeconfig(&gateway_config, &dir.join("gateway.kubeconfig"));
    // One replica without election, so it lives through the cut and its
    // watches resume (a new leader would list afresh).
    let operator = Operator::start(
        &ns.name,
        &operator_config,
        "op-c",
        &["--leader-election=false"],
    )
    .await;
    let gateway = Gateway::start(&dir, &gateway_config, &ns.name, &[operator.autoscaler]).await;
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    let one = |name: &str| {
        app(
            name,
            vec![workload("web", "AlwaysOn", json!({}))],
            json!([{"name": "r", "match": {"pathPrefix": format!("/{name}")}, "backends": [{"workload": "web"}]}]),
        )
    };
    for name in ["keep", "gone", "changed"] {
        apply(&apps, &one(name)).await;
    }
    for name in ["keep", "gone", "changed"] {
        wait_ready(&apps, name, Duration::from_secs(60)).await;
    }

    operator_path.cut();
    gateway_path.cut();
    apps.delete("gone", &DeleteParams::default()).await.unwrap();
    apply(&apps, &one("new")).await;
    let mut changed = one("changed");
    changed.spec.routes[0].matches.path_prefix = Some("/renamed".into());
    apply(&apps, &changed).await;
    // Several compactions pass: the watches' resourceVersions are gone.
    tokio::time::sleep(Duration::from_secs(16)).await;
    operator_path.restore().await;
    gateway_path.restore().await;

    for name in ["keep", "new", "changed"] {
        wait_ready(&apps, name, Duration::from_secs(60)).await;
    }
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        "the children of exactly the apps there are",
        Duration::from_secs(60),
        || async {
            let names: Vec<String> = deployments
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter(|d| d.metadata.deletion_timestamp.is_none())
                .filter_map(|d| d.metadata.name)
                .collect();
            let mut sorted = names.clone();
            sorted.sort();
            if sorted == ["changed-web", "keep-web", "new-web"] {
                Ok(())
            } else {
                Err(format!("{sorted:?}"))
            }
        },
    )
    .await;
    for (path, status) in [
        ("/keep", 200),
        ("/new", 200),
        ("/renamed", 200),
        ("/changed", 404),
        ("/gone", 404),
    ] {
        wait_for(
            &format!("{path} -> {status}"),
            Duration::from_secs(60),
            || async {
                match gateway.get(path).await {
                    Ok(answer) if answer.status == status => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    // The relists came from 410 Gone, not from a lucky fresh start.
    let expired = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("410") || l.contains("too old resource version") || l.contains("Expired")
            })
            .count()
    };
    let (operator_log, gateway_log) = (operator.log_text(), gateway.log_text());
    eprintln!(
        "compaction: 410s seen by the operator {}, by the gateway {}; operator restarts {}",
        expired(&operator_log),
        expired(&gateway_log),
        operator.restarts()
    );
    assert_eq!(operator.restarts(), 0);
    assert!(
        expired(&operator_log) > 0,
        "the operator's watches never saw 410:\n{operator_log}"
    );
    assert!(
        expired(&gateway_log) > 0,
        "the gateway's watches never saw 410"
    );
    let _ = operator.metrics().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_without_fighting_over_replicas_and_then_nothing_is_written() {
    let _serial = SERIAL.lock().await;
    environment();
    install_crd().await;
    let ns = TestNamespace::create("drift").await;
    let kubeconfig = account_kubeconfig(&ns.name, "tandem-operator-d", "operator-rbac.yaml").await;
    let operator = Operator::start(&ns.name, &kubeconfig, "op-d", &[]).await;
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    // Scaled by an HPA on CPU: Tandem owns neither its replicas nor the HPA's.
    apply(
        &apps,
        &app(
            "drift",
            vec![workload(
                "web",
                "AlwaysOn",
                json!({"scaling": {"metric": "cpu", "minReplicas": 1, "maxReplicas": 5}}),
            )],
            json!([{"name": "r", "match": {"pathPrefix": "/"}, "backends": [{"workload": "web"}]}]),
        ),
    )
    .await;
    wait_ready(&apps, "drift", Duration::from_secs(60)).await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let image = || async {
        deployments
            .get("drift-web")
            .await
            .ok()
            .and_then(|d| d.spec?.template.spec?.containers.first()?.image.clone())
            .unwrap_or_default()
    };
    // Another manager keeps setting its own image and a replica count.
    let drifter = PatchParams::apply("drifter").force();
    let drift = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "drift-web"},
        "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "image": "example/drifted:9"}]}}}});
    let mut restored = 0;
    for _ in 0..5 {
        deployments
            .patch("drift-web", &drifter, &Patch::Apply(&drift))
            .await
            .unwrap();
        wait_for(
            "the image to be restored",
            Duration::from_secs(20),
            || async {
                if image().await == "example/echo:1" {
                    Ok(())
                } else {
                    Err(image().await)
                }
            },
        )
        .await;
        restored += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let replicas = deployments
        .get("drift-web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas;
    assert_eq!(replicas, Some(3), "replicas it does not own are left alone");
    // Converged: 30 s without a single write by the operator (its Lease
    // renewals aside: that is leader election, not reconciling).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let since = k8s_openapi::jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let writes: Vec<Write> = writes_in(&ns.name)
        .into_iter()
        .filter(|w| is_operator(&w.user) && w.resource != "leases" && w.received >= since)
        .collect();
    let writes: Vec<String> = writes
        .iter()
        .map(|w| format!("{} {} {} at {}", w.user, w.resource, w.name, w.received))
        .collect();
    eprintln!("drift: restored {restored} times; writes in the 30 s after: {writes:?}");
    assert!(writes.is_empty(), "{writes:?}");
    let _ = operator.metrics().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_app_takes_its_children_within_10s() {
    let _serial = SERIAL.lock().await;
    environment();
    install_crd().await;
    let ns = TestNamespace::create("delete").await;
    let kubeconfig = account_kubeconfig(&ns.name, "tandem-operator-e", "operator-rbac.yaml").await;
    let _operator = Operator::start(&ns.name, &kubeconfig, "op-e", &[]).await;
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    // The garbage collector learns of a new CRD at its next discovery sync
    // (every 30 s): until it has, owner references to HybridApps wait. A
    // first app deleted and gone shows it knows them.
    apply(
        &apps,
        &app(
            "warm-up",
            vec![workload("fn", "Function", json!({}))],
            json!([{"name": "r", "match": {"pathPrefix": "/"}, "backends": [{"workload": "fn"}]}]),
        ),
    )
    .await;
    wait_ready(&apps, "warm-up", Duration::from_secs(60)).await;
    apps.delete("warm-up", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the garbage collector to know HybridApps",
        Duration::from_secs(90),
        || async {
            match deployments.get_opt("warm-up-fn").await {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|d| d.is_some()))),
            }
        },
    )
    .await;
    apply(
        &apps,
        &app(
            "doomed",
            vec![
                workload("web", "AlwaysOn", json!({"scaling": {"minReplicas": 2}})),
                workload("fn", "Function", json!({})),
            ],
            json!([{"name": "r", "match": {"pathPrefix": "/"}, "backends": [{"workload": "web"}]}]),
        ),
    )
    .await;
    wait_ready(&apps, "doomed", Duration::from_secs(60)).await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for("the web pods", Duration::from_secs(30), || async {
        let n = count(&pods).await?;
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        }
    })
    .await;
    let deleted = Instant::now();
    apps.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for("the children to go", Duration::from_secs(10), || async {
        let d = count(&deployments).await?;
        let s = count(&services).await?;
        let p = count(&pods).await?;
        let a = count(&apps).await?;
        if d + s + p + a == 0 {
            Ok(())
        } else {
            Err(format!("{a} apps, {d} deployments, {s} services, {p} pods"))
        }
    })
    .await;
    eprintln!(
        "delete: app and children gone {:?} after the delete",
        deleted.elapsed()
    );
}
