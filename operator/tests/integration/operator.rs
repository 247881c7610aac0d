//! The operator as a real process, under its declared RBAC, against the real
//! control plane: children, repair, status, steady state, crash recovery and
//! leader election.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tandem::api::{HybridApp, WorkloadState};
use testenv::{TestNamespace, wait_for};

use crate::support::{OperatorProcess, health, health_helper, install_crd, operator_kubeconfig};

const WAIT: Duration = Duration::from_secs(60);

fn workload(name: &str, mode: &str, env_value: &str) -> Value {
    json!({
        "name": name, "mode": mode, "port": 8080,
        "template": {"spec": {"containers": [{
            "name": "app", "image": "example/echo:1",
            "env": [{"name": "VERSION", "value": env_value}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}
        }]}}
    })
}

fn app(name: &str, workloads: Vec<Value>) -> HybridApp {
    let routes: Vec<Value> = workloads
        .iter()
        .map(|w| {
            let n = w["name"].as_str().unwrap();
            json!({"name": n, "match": {"pathPrefix": format!("/{n}")}, "backends": [{"workload": n}]})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": name},
        "spec": {"workloads": workloads, "routes": routes}
    }))
    .unwrap()
}

/// An app with an AlwaysOn `web` and a Function `fn`, one route each.
fn web_and_function(name: &str) -> HybridApp {
    app(
        name,
        vec![
            workload("web", "AlwaysOn", "1"),
            workload("fn", "Function", "1"),
        ],
    )
}

async fn setup(prefix: &str) -> (TestNamespace, std::path::PathBuf) {
    install_crd().await;
    let ns = TestNamespace::create(prefix).await;
    let kubeconfig = operator_kubeconfig(&ns.name).await;
    (ns, kubeconfig)
}

fn condition(app: &HybridApp, type_: &str) -> Option<(String, String)> {
    app.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn wait_ready(apps: &Api<HybridApp>, name: &str) -> HybridApp {
    wait_for(
        &format!("HybridApp {name} Ready with status caught up"),
        WAIT,
        || async {
            let app = apps.get(name).await.map_err(|e| e.to_string())?;
            let caught_up =
                app.status.as_ref().and_then(|s| s.observed_generation) == app.metadata.generation;
            match condition(&app, "Ready") {
                Some((status, _)) if status == "True" && caught_up => Ok(app),
                other => Err(format!(
                    "Ready={other:?}, caught up={caught_up}, status={:?}",
                    app.status
                )),
            }
        },
    )
    .await
}

async fn names<K>(api: &Api<K>) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|o| o.meta().deletion_timestamp.is_none())
                .map(|o| o.name_any())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_children_through_create_update_remove_and_delete() {
    let (ns, kubeconfig) = setup("lifecycle").await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    operator.wait_ready().await;
    let apps: Api<HybridApp> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();

    apps.create(&PostParams::default(), &web_and_function("shop"))
        .await
        .unwrap();
    let ready = wait_ready(&apps, "shop").await;
    let status = ready.status.unwrap();
    let state: BTreeMap<String, WorkloadState> = status
        .workloads
        .iter()
        .map(|w| (w.name.clone(), w.state))
        .collect();
    assert_eq!(state["web"], WorkloadState::Ready);
    assert_eq!(
        state["fn"],
        WorkloadState::ScaledToZero,
        "a Function starts at zero"
    );
    assert_eq!(names(&deployments).await, ["shop-fn", "shop-web"]);
    assert_eq!(
        names(&services).await,
        ["shop-fn", "shop-fn-private", "shop-web", "shop-web-private"]
    );
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = ns.api();
    let ours = ListParams::default().labels("endpointslice.kubernetes.io/managed-by=tandem.dev");
    let slice_names = || async {
        let mut names: Vec<String> = slices
            .list(&ours)
            .await
            .unwrap()
            .iter()
            .map(|s| s.name_any())
            .collect();
        names.sort();
        names
    };
    // Both are reached through the gateways (scaled on concurrency); the
    // slices come once the operator has heard from the gateways (none here).
    wait_for("the public Services' EndpointSlices", WAIT, || async {
        match slice_names().await {
            names if names == ["shop-fn-gateways", "shop-web-gateways"] => Ok(()),
            names => Err(format!("{names:?}")),
        }
    })
    .await;
    let web = deployments.get("shop-web").await.unwrap();
    assert_eq!(web.spec.as_ref().unwrap().replicas, Some(1));
    let owner = &web.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("HybridApp", Some(true))
    );

    // The pod template changes: the Deployment rolls to a new ReplicaSet.
    let replica_sets: Api<ReplicaSet> = ns.api();
    let before = names(&replica_sets).await;
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"workloads": [workload("web", "AlwaysOn", "2"), workload("fn", "Function", "1")]}})))
        .await
        .unwrap();
    wait_for("the web Deployment to roll out version 2", WAIT, || async {
        let d = deployments
            .get("shop-web")
            .await
            .map_err(|e| e.to_string())?;
        let env = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env;
        let value = env
            .as_ref()
            .and_then(|e| e.first())
            .and_then(|e| e.value.clone());
        let s = d.status.clone().unwrap_or_default();
        let done = value.as_deref() == Some("2")
            && s.observed_generation == d.metadata.generation
            && s.updated_replicas == Some(1)
            && s.ready_replicas == Some(1)
            && s.replicas == Some(1);
        if done {
            Ok(())
        } else {
            Err(format!("env {value:?}, status {s:?}"))
        }
    })
    .await;
    let after = names(&replica_sets).await;
    assert!(
        after.iter().any(|rs| !before.contains(rs)),
        "a new ReplicaSet: before {before:?}, after {after:?}"
    );
    wait_ready(&apps, "shop").await;

    // A workload leaves the spec: its children go.
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {
        "workloads": [workload("web", "AlwaysOn", "2")],
        "routes": [{"name": "web", "match": {"pathPrefix": "/web"}, "backends": [{"workload": "web"}]}]
    }})))
    .await
    .unwrap();
    wait_for("the fn children to be deleted", WAIT, || async {
        let (d, s) = (names(&deployments).await, names(&services).await);
        let e = slice_names().await;
        if d == ["shop-web"] && s == ["shop-web", "shop-web-private"] && e == ["shop-web-gateways"]
        {
            Ok(())
        } else {
            Err(format!("deployments {d:?}, services {s:?}, slices {e:?}"))
        }
    })
    .await;

    // The app is deleted: the garbage collector removes everything.
    apps.delete("shop", &DeleteParams::background())
        .await
        .unwrap();
    let pods: Api<Pod> = ns.api();
    wait_for("every child garbage-collected", WAIT, || async {
        let (d, s, p) = (
            names(&deployments).await,
            names(&services).await,
            names(&pods).await,
        );
        if d.is_empty() && s.is_empty() && p.is_empty() {
            Ok(())
        } else {
            Err(format!("{d:?} {s:?} {p:?}"))
        }
    })
    .await;
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_owned_fields_but_leaves_replicas_to_their_owner() {
    let (ns, kubeconfig) = setup("repair").await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let apps: Api<HybridApp> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    apps.create(&PostParams::default(), &web_and_function("edit"))
        .await
        .unwrap();
    wait_ready(&apps, "edit").await;

    // Someone edits the image: reverted.
    let by_hand = PatchParams {
        field_manager: Some("someone".into()),
        ..PatchParams::default()
    };
    deployments
        .patch("edit-web", &by_hand, &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "evil/image:6"}]}}}})))
        .await
        .unwrap();
    wait_for(
        "the image to be reverted",
        Duration::from_secs(20),
        || async {
            let d = deployments
                .get("edit-web")
                .await
                .map_err(|e| e.to_string())?;
            let image = d.spec.unwrap().template.spec.unwrap().containers[0]
                .image
                .clone();
            if image.as_deref() == Some("example/echo:1") {
                Ok(())
            } else {
                Err(format!("image {image:?}"))
            }
        },
    )
    .await;

    // Someone deletes the Service: recreated.
    services
        .delete("edit-fn", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the Service to be recreated",
        Duration::from_secs(20),
        || async {
            match services
                .get_opt("edit-fn")
                .await
                .map_err(|e| e.to_string())?
            {
                Some(s) if s.metadata.deletion_timestamp.is_none() => Ok(()),
                other => Err(format!("{:?}", other.map(|s| s.metadata))),
            }
        },
    )
    .await;

    // The autoscaler (here: a hand-made scale write under its field manager)
    // sets replicas of the Function; the reconciler must not undo it, even
    // when it applies other changes to the same Deployment.
    let as_autoscaler = PatchParams::apply(tandem::api::contract::AUTOSCALER_MANAGER).force();
    deployments
        .patch(
            "edit-fn",
            &as_autoscaler,
            &Patch::Apply(
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 2}}),
            ),
        )
        .await
        .unwrap();
    apps.patch("edit", &PatchParams::default(), &Patch::Merge(json!({"spec": {"workloads": [workload("web", "AlwaysOn", "1"), workload("fn", "Function", "2")]}})))
        .await
        .unwrap();
    wait_for("the fn template change applied", WAIT, || async {
        let d = deployments
            .get("edit-fn")
            .await
            .map_err(|e| e.to_string())?;
        let env = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap_or_default();
        if env.first().and_then(|e| e.value.as_deref()) == Some("2") {
            Ok(())
        } else {
            Err(format!("{env:?}"))
        }
    })
    .await;
    wait_ready(&apps, "edit").await;
    let fn_deployment = deployments.get("edit-fn").await.unwrap();
    assert_eq!(
        fn_deployment.spec.as_ref().unwrap().replicas,
        Some(2),
        "replicas belong to the autoscaler"
    );
    let replicas_owners: Vec<String> = fn_deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        replicas_owners,
        [tandem::api::contract::AUTOSCALER_MANAGER],
        "exactly one owner of replicas"
    );
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_writes_nothing() {
    let (ns, kubeconfig) = setup("steady").await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &["--resync=5s"]).await;
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &web_and_function("calm"))
        .await
        .unwrap();
    wait_ready(&apps, "calm").await;
    // Let late watch events (pod readiness, endpoint updates) settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    async fn add<K>(all: &mut BTreeMap<String, String>, api: Api<K>)
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        for object in api.list(&ListParams::default()).await.unwrap() {
            let key = format!("{}/{}", K::kind(&()), object.name_any());
            all.insert(key, object.resource_version().unwrap());
        }
    }
    async fn versions(ns: &TestNamespace) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        add(&mut all, ns.api::<HybridApp>()).await;
        add(&mut all, ns.api::<Deployment>()).await;
        add(&mut all, ns.api::<Service>()).await;
        add(
            &mut all,
            ns.api::<k8s_openapi::api::discovery::v1::EndpointSlice>(),
        )
        .await;
        add(
            &mut all,
            ns.api::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>(),
        )
        .await;
        all
    }
    let before = versions(&ns).await;
    let writes_before = operator.writes().await;
    // 30 s, with a resync every 5 s, so the reconciler runs several times.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(versions(&ns).await, before, "no object changed");
    assert_eq!(
        operator.writes().await,
        writes_before,
        "the operator sent no write"
    );
    let reconciles = operator.get("/metrics").await.unwrap();
    assert!(
        reconciles.contains("tandem_reconciles_total{result=\"success\"}"),
        "{reconciles}"
    );
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_after_sigkill_in_the_middle_of_20_apps() {
    let (ns, kubeconfig) = setup("crash").await;
    let apps: Api<HybridApp> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    let first = OperatorProcess::start(
        &ns.name,
        &kubeconfig,
        "op-1",
        &["--max-concurrent-reconciles=2"],
    )
    .await;
    first.wait_ready().await;
    for i in 0..20 {
        let workloads = vec![
            workload("a", "Function", "1"),
            workload("b", "Function", "1"),
        ];
        apps.create(
            &PostParams::default(),
            &app(&format!("app{i:02}"), workloads),
        )
        .await
        .unwrap();
    }
    // Kill it once some, but not all, children exist.
    wait_for("the first children", WAIT, || async {
        let n = names(&deployments).await.len();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} deployments"))
        }
    })
    .await;
    first.kill().await;
    let at_kill = names(&deployments).await.len();
    eprintln!("killed the operator with {at_kill} of 40 Deployments created");

    let second = OperatorProcess::start(&ns.name, &kubeconfig, "op-2", &[]).await;
    let expected: Vec<String> = {
        let mut all: Vec<String> = (0..20)
            .flat_map(|i| [format!("app{i:02}-a"), format!("app{i:02}-b")])
            .collect();
        all.sort();
        all
    };
    wait_for(
        "all 40 Deployments and Services, and every status caught up",
        Duration::from_secs(120),
        || async {
            let (d, s) = (names(&deployments).await, names(&services).await);
            let list = apps
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let behind: Vec<String> = list
                .items
                .iter()
                .filter(|a| {
                    a.status.as_ref().and_then(|s| s.observed_generation) != a.metadata.generation
                })
                .map(|a| a.name_any())
                .collect();
            let public: Vec<String> = s
                .iter()
                .filter(|n| !n.ends_with("-private"))
                .cloned()
                .collect();
            let private = s.len() - public.len();
            if d == expected && public == expected && private == expected.len() && behind.is_empty()
            {
                Ok(())
            } else {
                Err(format!(
                    "{} deployments, {} services, behind: {behind:?}",
                    d.len(),
                    s.len()
                ))
            }
        },
    )
    .await;
    // No duplicates or strays: exactly the expected names, each owned by its app.
    for d in deployments.list(&ListParams::default()).await.unwrap() {
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert!(
            d.name_any().starts_with(&format!("{}-", owner.name)),
            "{} owned by {}",
            d.name_any(),
            owner.name
        );
    }
    first.assert_never_forbidden();
    second.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_writes_and_the_other_takes_over() {
    let (ns, kubeconfig) = setup("leader").await;
    let apps: Api<HybridApp> = ns.api();
    let leases: Api<Lease> = ns.api();
    let one = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let two = OperatorProcess::start(&ns.name, &kubeconfig, "op-2", &[]).await;
    apps.create(
        &PostParams::default(),
        &app("led", vec![workload("fn", "Function", "1")]),
    )
    .await
    .unwrap();
    wait_ready(&apps, "led").await;

    let holder = leases
        .get("tandem-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    let (leader, standby) = if holder == one.identity {
        (&one, &two)
    } else {
        (&two, &one)
    };
    assert!(leader.writes().await > 0, "the leader wrote the children");
    assert_eq!(standby.writes().await, 0, "the standby wrote nothing");
    // Gateways send to every replica: the standby turns them away at once.
    let demand = http::Request::post(format!("http://{}/v1/demand", standby.autoscaler))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let answer = testenv::http_client::send(demand, std::time::Duration::from_secs(2))
        .await
        .expect("the standby answers at once");
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.body.contains("standby"), "{}", answer.body);

    leader.kill().await;
    let killed_at = std::time::Instant::now();
    apps.create(
        &PostParams::default(),
        &app("after", vec![workload("fn", "Function", "1")]),
    )
    .await
    .unwrap();
    wait_ready(&apps, "after").await;
    let took = killed_at.elapsed();
    let holder = leases
        .get("tandem-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert_eq!(holder, standby.identity, "the standby holds the lease");
    assert!(standby.writes().await > 0, "the new leader writes");
    eprintln!(
        "takeover: new app Ready {:.1}s after the leader was killed (lease duration 6s)",
        took.as_secs_f64()
    );
    one.assert_never_forbidden();
    two.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_schema_cannot_catch_stalls_with_a_reason() {
    let (ns, kubeconfig) = setup("stall").await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let apps: Api<HybridApp> = ns.api();
    let mut bad = workload("fn", "Function", "1");
    bad["template"]["metadata"] = json!({"labels": {"tandem.dev/app": "other"}});
    apps.create(&PostParams::default(), &app("bad", vec![bad]))
        .await
        .unwrap();
    let stalled = wait_for("the app to report Stalled", WAIT, || async {
        let app = apps.get("bad").await.map_err(|e| e.to_string())?;
        match condition(&app, "Stalled") {
            Some((s, reason)) if s == "True" && reason == "InvalidSpec" => Ok(app),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let ready = stalled
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("tandem.dev/app is set by Tandem"),
        "{}",
        ready.message
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    wait_for("an InvalidSpec event", Duration::from_secs(20), || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        if list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec"))
        {
            Ok(())
        } else {
            Err("none".into())
        }
    })
    .await;
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_cannot_be_read_is_skipped_with_an_event_and_the_others_sync() {
    use k8s_openapi::api::events::v1::Event;
    use kube::api::{ApiResource, DynamicObject};
    let (ns, kubeconfig) = setup("unreadable").await;
    let raw: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::erase::<HybridApp>(&()),
    );
    // Stored as the schema allows (a template's metadata is free-form), but
    // not readable as Tandem's types: a label whose value is a number.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "bad"},
        "spec": {
            "workloads": [{"name": "web", "mode": "AlwaysOn", "port": 8080,
                "template": {"metadata": {"labels": {"team": 5}},
                             "spec": {"containers": [{"name": "c", "image": "example/echo:1"}]}}}],
            "routes": [{"name": "r", "match": {"pathPrefix": "/bad"}, "backends": [{"workload": "web"}]}]
        }
    }))
    .unwrap();
    raw.create(&PostParams::default(), &bad)
        .await
        .expect("the API server stores it");
    let apps: Api<HybridApp> = Api::namespaced(ns.client.clone(), &ns.name);
    assert!(
        apps.list(&ListParams::default()).await.is_err(),
        "a typed list fails on it (what used to block every watch's sync)"
    );
    raw.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::to_value(web_and_function("good")).unwrap()).unwrap(),
    )
    .await
    .unwrap();

    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op", &[]).await;
    operator.wait_ready().await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for("the good app's children", WAIT, || async {
        let names = names(&deployments).await;
        if names == ["good-fn", "good-web"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let unreadable = wait_for("an Unreadable event on the bad app", WAIT, || async {
        let found: Vec<Event> = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Unreadable"))
            .collect();
        if found.is_empty() {
            Err("none yet".to_string())
        } else {
            Ok(found)
        }
    })
    .await;
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    let event = &unreadable[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("bad")
    );
    let note = event.note.clone().unwrap_or_default();
    assert!(note.contains("invalid type"), "{note}");
    assert!(
        deployments.get_opt("bad-web").await.unwrap().is_none(),
        "nothing is made of an app that cannot be read"
    );

    // The gateway syncs too, and routes the app it can read.
    let dir = testenv::environment()
        .control_plane
        .dir
        .join(format!("unreadable-{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let gateway_kubeconfig =
        crate::support::account_kubeconfig(&ns.name, "tandem-gateway", "gateway-rbac.yaml").await;
    let gateway =
        crate::gateway::GatewayHandle::start_kubernetes(&dir, &gateway_kubeconfig, &ns.name, &[])
            .await;
    wait_for("the good app through the gateway", WAIT, || async {
        let answer = testenv::http_client::get(&gateway.url("/web/x"))
            .await
            .map_err(|e| e.to_string())?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(format!("{}: {}", answer.status, answer.body))
        }
    })
    .await;
    let bad = testenv::http_client::get(&gateway.url("/bad"))
        .await
        .unwrap();
    assert_eq!(bad.status, 404, "{}", bad.body);
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_and_argo_cd_health_follow_an_app_from_in_progress_to_ready_and_a_stalled_one() {
    let helper = health_helper();
    // The script in the docs is the one tested.
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/argocd-health.lua"
    ))
    .unwrap();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/gitops.md")).unwrap();
    let body: Vec<&str> = script.lines().skip_while(|l| l.starts_with("--")).collect();
    let indented: String = body.iter().map(|l| format!("    {l}\n")).collect();
    assert!(
        docs.contains(&indented),
        "docs/gitops.md shows docs/argocd-health.lua"
    );

    let (ns, kubeconfig) = setup("health").await;
    let _operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let apps: Api<HybridApp> = ns.api();
    // Pods that take 3 s to become ready: the app converges for a while.
    let mut slow = workload("web", "AlwaysOn", "1");
    slow["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "ECHO_STARTUP_DELAY_MS", "value": "3000"}));
    apps.create(&PostParams::default(), &app("slow", vec![slow]))
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let ready = wait_for("Current and Healthy", WAIT, || async {
        let app = apps.get("slow").await.map_err(|e| e.to_string())?;
        let verdict = health(&helper, &app);
        let observed = app
            .status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .is_some();
        let mut seen = seen.lock().unwrap();
        if seen.last() != Some(&(observed, verdict.clone())) {
            seen.push((observed, verdict.clone()));
        }
        match (&verdict.0.0[..], &verdict.1.0[..]) {
            ("Current", "Healthy") => Ok(verdict),
            _ => Err(format!("{verdict:?}")),
        }
    })
    .await;
    let seen = seen.into_inner().unwrap();
    eprintln!("health while converging: {seen:?}");
    // Once the operator wrote status and until Ready: in progress for both.
    let converging: Vec<_> = seen
        .iter()
        .filter(|(observed, v)| *observed && v.0.0 != "Current")
        .collect();
    assert!(!converging.is_empty(), "{seen:?}");
    for (_, ((kstatus, _), (argo, message))) in &converging {
        assert_eq!(kstatus, "InProgress", "{seen:?}");
        assert_eq!(argo, "Progressing", "{seen:?}");
        assert!(!message.is_empty(), "{seen:?}");
    }
    assert!(ready.1.1.contains("ready"), "{ready:?}");
    // Before the operator wrote any status, kstatus cannot tell (it says
    // Current: docs/gitops.md explains); the Argo CD check waits.
    for (_, (_, (argo, _))) in seen.iter().filter(|(observed, _)| !observed) {
        assert_eq!(argo, "Progressing", "{seen:?}");
    }

    // A spec the schema cannot catch: Stalled, so Failed and Degraded.
    let mut bad = workload("fn", "Function", "1");
    bad["template"]["metadata"] = json!({"labels": {"tandem.dev/app": "other"}});
    apps.create(&PostParams::default(), &app("bad", vec![bad]))
        .await
        .unwrap();
    let failed = wait_for("Failed and Degraded", WAIT, || async {
        let app = apps.get("bad").await.map_err(|e| e.to_string())?;
        let verdict = health(&helper, &app);
        match (&verdict.0.0[..], &verdict.1.0[..]) {
            ("Failed", "Degraded") => Ok(verdict),
            _ => Err(format!("{verdict:?}")),
        }
    })
    .await;
    eprintln!("health of a stalled app: {failed:?}");
    assert!(
        failed.1.1.contains("tandem.dev/app is set by Tandem"),
        "{failed:?}"
    );
    assert!(failed.0.1.contains("tandem.dev/app"), "{failed:?}");
}
