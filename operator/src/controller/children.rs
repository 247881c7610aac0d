//! The children of a HybridApp, built as pure functions of its spec: per
//! workload a Deployment, a public Service `<app>-<workload>` that callers
//! use, a headless private Service that selects the pods (the gateways read
//! its EndpointSlices), and a HorizontalPodAutoscaler for AlwaysOn
//! workloads scaled on CPU.
//!
//! The public Service of a workload reached through the gateways (see
//! [`Workload::through_gateway`]) has no selector: Tandem writes its
//! EndpointSlices, which list the live gateways on a port of their own for
//! that workload. Whatever reaches those endpoints (kube-proxy for a
//! cluster-IP caller, an ingress or mesh that reads EndpointSlices) lands on
//! the workload's port of a gateway, which serves it as that workload
//! whatever the Host header says. Other workloads' public Service selects
//! their pods, and callers reach them with no Tandem hop.
//!
//! Objects are built as JSON for server-side apply: only the fields Tandem
//! owns appear, so fields owned by others (the autoscaler's or the HPA's
//! `replicas`, defaults, other tools' annotations) are never touched.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::api::labels;
use crate::api::{HybridApp, Metric, Mode, Workload};

/// Where the gateways are, for the public Services that point at them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// Addresses the live gateways advertise, sorted.
    pub gateways: Vec<IpAddr>,
    /// The gateway port of each workload reached through the gateways (one
    /// missing gets no endpoints).
    pub ports: BTreeMap<String, u16>,
}

/// The children Tandem wants for one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadChildren {
    /// Workload name.
    pub workload: String,
    /// Name shared by the Deployment, public Service and HPA.
    pub name: String,
    /// Deployment, without `spec.replicas` (see [`initial_replicas`]).
    pub deployment: Value,
    /// The public ClusterIP Service: selects the pods, or (through the
    /// gateways) has no selector and the [`endpoint_slices`] below.
    pub service: Value,
    /// Name of the private Service.
    pub private_name: String,
    /// Headless Service selecting the pods, for the gateways.
    pub private_service: Value,
    /// EndpointSlices of the public Service, one per address family of the
    /// gateways (always an IPv4 one, empty while no gateway is live); none
    /// when callers reach the pods directly.
    pub endpoint_slices: Vec<Value>,
    /// The gateways' port for this workload, when reached through them.
    pub gateway_port: Option<u16>,
    /// HPA, for AlwaysOn workloads with `metric: cpu`.
    pub hpa: Option<Value>,
    /// Replicas the Deployment starts with when it is first created.
    pub initial_replicas: i32,
}

/// Annotation holding a fingerprint of what Tandem last applied, so a field
/// removed from the spec is noticed even though it is still on the child.
pub const APPLIED_HASH: &str = "tandem.dev/applied-hash";

/// Deterministic child name: `<app>-<workload>` (at most 63 characters, as
/// the CRD limits both parts).
pub use crate::api::contract::child_name;

/// Builds the children of every workload of `app`.
pub fn build(app: &HybridApp, placement: &Placement) -> Vec<WorkloadChildren> {
    app.spec
        .workloads
        .iter()
        .map(|w| build_workload(app, w, placement))
        .collect()
}

/// Names of the EndpointSlices Tandem may write for public Service `name`.
pub fn slice_names(name: &str) -> [String; 2] {
    [format!("{name}-gateways"), format!("{name}-gateways-v6")]
}

fn owner_reference(app: &HybridApp) -> Value {
    json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "HybridApp",
        "name": app.metadata.name,
        "uid": app.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

fn build_workload(app: &HybridApp, workload: &Workload, placement: &Placement) -> WorkloadChildren {
    let app_name = app.metadata.name.clone().unwrap_or_default();
    let namespace = app.metadata.namespace.clone().unwrap_or_default();
    let name = child_name(&app_name, &workload.name);
    let private_name = crate::api::contract::private_name(&app_name, &workload.name);
    let selector = labels::selector(&app_name, &workload.name);
    let labels = labels::workload(&app_name, &workload.name, workload.mode);
    let service_labels =
        |kind: &str| labels::service(&app_name, &workload.name, workload.mode, kind);
    let scaling = workload.scaling();

    let mut template =
        serde_json::to_value(&workload.template).unwrap_or_else(|_| json!({"spec": {}}));
    add_pod_labels(&mut template, &labels::pod(&app_name, &workload.name));
    add_named_port(&mut template, workload.port);

    let named = |name: &str, kind_labels: &Value| {
        json!({
            "name": name,
            "namespace": namespace,
            "labels": kind_labels,
            "ownerReferences": [owner_reference(app)],
        })
    };
    let metadata = |kind_labels: &Value| named(&name, kind_labels);
    let mut deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(&labels),
        "spec": {
            "selector": {"matchLabels": selector},
            "template": template,
        }
    });
    let http_port = |target: i32| json!([{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP", "appProtocol": "http"}]);
    let gateway_port = workload
        .through_gateway()
        .then(|| placement.ports.get(&workload.name).copied())
        .flatten();
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(&service_labels(labels::PUBLIC)),
        "spec": {"type": "ClusterIP"},
    });
    let mut endpoint_slices = Vec::new();
    if workload.through_gateway() {
        // No selector: the slices below are the endpoints. The target port
        // records the gateways' port (kube-proxy takes the slices' port).
        let port = gateway_port.map_or(workload.port, i32::from);
        service["spec"]["ports"] = http_port(port);
        if let Some(port) = gateway_port {
            let [v4_name, v6_name] = slice_names(&name);
            let mut slice_labels = service_labels(labels::PUBLIC);
            slice_labels[labels::SERVICE_NAME] = json!(name);
            slice_labels[labels::SLICE_MANAGED_BY] = json!(labels::SLICE_MANAGER);
            let slice = |slice_name: &str, family: &str, addresses: Vec<&IpAddr>| {
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": named(slice_name, &slice_labels),
                    "addressType": family,
                    "ports": [{"name": "http", "port": port, "protocol": "TCP", "appProtocol": "http"}],
                    "endpoints": addresses.iter().map(|ip| json!({
                        "addresses": [ip.to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                    })).collect::<Vec<_>>(),
                })
            };
            let (v4, v6): (Vec<&IpAddr>, Vec<&IpAddr>) =
                placement.gateways.iter().partition(|ip| ip.is_ipv4());
            endpoint_slices.push(slice(&v4_name, "IPv4", v4));
            if !v6.is_empty() {
                endpoint_slices.push(slice(&v6_name, "IPv6", v6));
            }
        }
    } else {
        service["spec"]["selector"] = selector.clone();
        service["spec"]["ports"] = http_port(workload.port);
    }
    let mut private_service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": named(&private_name, &service_labels(labels::PRIVATE)),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": http_port(workload.port),
        }
    });
    let mut hpa = (workload.mode == Mode::AlwaysOn && scaling.metric == Metric::Cpu).then(|| {
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(&labels),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": scaling.min_replicas,
                "maxReplicas": scaling.max_replicas,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization}}}],
            }
        })
    });
    stamp(&mut deployment);
    stamp(&mut service);
    stamp(&mut private_service);
    for slice in &mut endpoint_slices {
        stamp(slice);
    }
    if let Some(hpa) = hpa.as_mut() {
        stamp(hpa);
    }
    let initial_replicas = match workload.mode {
        Mode::Function => scaling.min_replicas,
        Mode::AlwaysOn => scaling.min_replicas.max(1),
        // Placed AlwaysOn until the traffic says otherwise.
        Mode::Auto => 1,
    };
    WorkloadChildren {
        workload: workload.name.clone(),
        name,
        deployment,
        service,
        private_name,
        private_service,
        endpoint_slices,
        gateway_port,
        hpa,
        initial_replicas,
    }
}

fn add_pod_labels(template: &mut Value, labels: &Value) {
    let metadata = ensure_object(template, "metadata");
    let pod_labels = ensure_object(metadata, "labels");
    for (k, v) in labels.as_object().into_iter().flatten() {
        pod_labels[k] = v.clone();
    }
}

/// Names the serving port `http` on the first container unless a port with
/// that number is already declared (a user's own name is kept).
fn add_named_port(template: &mut Value, port: i32) {
    let Some(container) = template
        .pointer_mut("/spec/containers/0")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let ports = container
        .entry("ports")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(ports) = ports.as_array_mut() else {
        return;
    };
    let declared = ports
        .iter()
        .any(|p| p.get("containerPort").and_then(Value::as_i64) == Some(i64::from(port)));
    if !declared {
        ports.push(json!({"name": "http", "containerPort": port, "protocol": "TCP"}));
    }
}

fn ensure_object<'a>(value: &'a mut Value, key: &str) -> &'a mut Value {
    if !value.get(key).is_some_and(Value::is_object) {
        value[key] = json!({});
    }
    &mut value[key]
}

/// Records the fingerprint of `object` (without the annotation) in its
/// annotations.
fn stamp(object: &mut Value) {
    let hash = fingerprint(object);
    ensure_object(ensure_object(object, "metadata"), "annotations")[APPLIED_HASH] =
        Value::String(hash);
}

/// A stable fingerprint of a JSON value (keys are sorted by serde_json's map).
pub fn fingerprint(value: &Value) -> String {
    let text = value.to_string();
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}

/// Whether `live` already holds everything in `desired`: same fingerprint
/// annotation (nothing was removed from the spec) and every field Tandem
/// sets has the same value (nobody edited it). Lists must match element by
/// element; fields the server or others added are ignored.
pub fn up_to_date(desired: &Value, live: &Value) -> bool {
    let annotation = |v: &Value| {
        v.pointer("/metadata/annotations")
            .and_then(|a| a.get(APPLIED_HASH))
            .cloned()
    };
    annotation(desired) == annotation(live) && contains(live, desired)
}

fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        // The server drops an empty list (an EndpointSlice without
        // endpoints comes back without the field).
        (Value::Object(l), Value::Object(d)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => contains(lv, dv),
            None => dv.as_array().is_some_and(Vec::is_empty),
        }),
        (Value::Null, Value::Array(d)) => d.is_empty(),
        (Value::Array(l), Value::Array(d)) => {
            l.len() == d.len() && l.iter().zip(d).all(|(lv, dv)| contains(lv, dv))
        }
        // The server may store a number we sent as a string-int or vice versa
        // only for int-or-string fields; compare those loosely.
        (Value::String(l), Value::Number(d)) | (Value::Number(d), Value::String(l)) => {
            l == &d.to_string()
        }
        (l, d) => l == d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(yaml: &str) -> HybridApp {
        let mut app: HybridApp = serde_yaml::from_str(yaml).unwrap();
        app.metadata.namespace = Some("shop-ns".into());
        app.metadata.uid = Some("uid-1".into());
        app
    }

    const SHOP: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: HybridApp
metadata: {name: shop}
spec:
  workloads:
    - name: web
      mode: AlwaysOn
      port: 8080
      template:
        metadata: {labels: {team: store}}
        spec: {containers: [{name: app, image: example/web:1, ports: [{name: web, containerPort: 8080}]}]}
      scaling: {minReplicas: 2, metric: cpu, targetCpuUtilization: 70}
    - name: thumbs
      mode: Function
      port: 9000
      template: {spec: {containers: [{name: fn, image: example/thumbs:2}]}}
  routes:
    - {name: all, match: {pathPrefix: /}, backends: [{workload: web}, {workload: thumbs}]}
"#;

    #[test]
    fn builds_a_deployment_and_service_per_workload_with_deterministic_names() {
        let children = build(&app(SHOP), &Placement::default());
        let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["shop-web", "shop-thumbs"]);
        let thumbs = &children[1];
        assert_eq!(thumbs.deployment["metadata"]["namespace"], "shop-ns");
        assert_eq!(
            thumbs.deployment["metadata"]["ownerReferences"][0]["uid"],
            "uid-1"
        );
        assert_eq!(
            thumbs.deployment["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert!(
            thumbs.deployment["spec"].get("replicas").is_none(),
            "replicas belong to the autoscaler"
        );
        assert_eq!(thumbs.initial_replicas, 0, "a Function starts at zero");
        assert_eq!(children[0].initial_replicas, 2);
        let selector = &thumbs.deployment["spec"]["selector"]["matchLabels"];
        assert_eq!(selector, &thumbs.private_service["spec"]["selector"]);
        let pod_labels = &thumbs.deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "pods carry the selector label {k}");
        }
        assert!(
            pod_labels.get(labels::MODE).is_none(),
            "a mode changed in place restarts no pod"
        );
        assert_eq!(
            thumbs.deployment["metadata"]["labels"][labels::MODE],
            "function"
        );
        assert_eq!(thumbs.service["spec"]["ports"][0]["targetPort"], 9000);
    }

    #[test]
    fn a_function_is_public_through_the_gateways_and_private_to_its_pods() {
        let placement = Placement {
            gateways: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            ports: [("thumbs".to_string(), 20123)].into(),
        };
        let children = build(&app(SHOP), &placement);
        let (web, thumbs) = (&children[0], &children[1]);

        // The function: a public Service without selector, whose slices list
        // the gateways on the workload's port, one per address family.
        assert!(thumbs.service["spec"].get("selector").is_none());
        assert_eq!(thumbs.service["spec"]["ports"][0]["port"], 80);
        assert_eq!(thumbs.service["spec"]["ports"][0]["targetPort"], 20123);
        assert_eq!(thumbs.gateway_port, Some(20123));
        assert_eq!(thumbs.endpoint_slices.len(), 2);
        let v4 = &thumbs.endpoint_slices[0];
        assert_eq!(v4["metadata"]["name"], "shop-thumbs-gateways");
        assert_eq!(v4["addressType"], "IPv4");
        assert_eq!(
            v4["metadata"]["labels"][labels::SERVICE_NAME],
            "shop-thumbs"
        );
        assert_eq!(
            v4["metadata"]["labels"][labels::SLICE_MANAGED_BY],
            "tandem.dev"
        );
        assert_eq!(
            v4["ports"],
            json!([{"name": "http", "port": 20123, "protocol": "TCP", "appProtocol": "http"}])
        );
        assert_eq!(v4["endpoints"][0]["addresses"], json!(["10.0.0.7"]));
        assert_eq!(thumbs.endpoint_slices[1]["addressType"], "IPv6");
        assert_eq!(
            thumbs.endpoint_slices[1]["endpoints"][0]["addresses"],
            json!(["fd00::7"])
        );
        // Its pods, for the gateways: headless, labelled private.
        assert_eq!(thumbs.private_name, "shop-thumbs-private");
        assert_eq!(thumbs.private_service["spec"]["clusterIP"], "None");
        assert_eq!(
            thumbs.private_service["spec"]["ports"][0]["targetPort"],
            9000
        );
        assert_eq!(
            thumbs.private_service["metadata"]["labels"][labels::SERVICE],
            "private"
        );
        assert_eq!(
            thumbs.service["metadata"]["labels"][labels::SERVICE],
            "public"
        );

        // Always-on on CPU: callers reach the pods directly.
        assert_eq!(
            web.service["spec"]["selector"],
            web.private_service["spec"]["selector"]
        );
        assert_eq!(web.service["spec"]["ports"][0]["targetPort"], 8080);
        assert!(web.endpoint_slices.is_empty());
        assert_eq!(web.gateway_port, None);

        // No gateway live yet: an empty IPv4 slice, so callers fail fast.
        let lonely = build(
            &app(SHOP),
            &Placement {
                gateways: vec![],
                ..placement
            },
        );
        assert_eq!(lonely[1].endpoint_slices.len(), 1);
        assert_eq!(lonely[1].endpoint_slices[0]["endpoints"], json!([]));
    }

    #[test]
    fn names_the_port_http_unless_the_user_declared_it() {
        let children = build(&app(SHOP), &Placement::default());
        let thumbs_ports =
            &children[1].deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
        assert_eq!(
            thumbs_ports,
            &json!([{"name": "http", "containerPort": 9000, "protocol": "TCP"}])
        );
        let web_ports =
            &children[0].deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
        assert_eq!(web_ports, &json!([{"name": "web", "containerPort": 8080}]));
        let web_labels = &children[0].deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(web_labels["team"], "store", "user labels are kept");
    }

    #[test]
    fn only_always_on_with_cpu_metric_gets_an_hpa() {
        let children = build(&app(SHOP), &Placement::default());
        let hpa = children[0].hpa.as_ref().expect("web scales on cpu");
        assert_eq!(hpa["spec"]["minReplicas"], 2);
        assert_eq!(hpa["spec"]["maxReplicas"], 10);
        assert_eq!(
            hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            70
        );
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "shop-web");
        assert!(children[1].hpa.is_none());
    }

    #[test]
    fn up_to_date_ignores_server_defaults_but_sees_edits_and_removals() {
        let desired = build(&app(SHOP), &Placement::default())[1]
            .deployment
            .clone();
        let mut live = desired.clone();
        // Server-added fields do not matter.
        live["spec"]["replicas"] = json!(3);
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        live["metadata"]["resourceVersion"] = json!("42");
        assert!(up_to_date(&desired, &live));
        // Someone edits a field Tandem owns.
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:1");
        assert!(!up_to_date(&desired, &edited));
        // An empty list the server dropped is still what Tandem wants.
        let slice = build(
            &app(SHOP),
            &Placement {
                ports: [("thumbs".to_string(), 20001)].into(),
                ..Default::default()
            },
        )[1]
        .endpoint_slices[0]
            .clone();
        let mut stored = slice.clone();
        stored.as_object_mut().unwrap().remove("endpoints");
        assert!(up_to_date(&slice, &stored));
        // The spec dropped something: the fingerprint differs.
        let mut smaller = app(SHOP);
        smaller.spec.workloads[1].template.metadata = None;
        let rebuilt = build(&smaller, &Placement::default())[1].deployment.clone();
        assert_eq!(rebuilt, desired, "same content, same object");
        let mut with_env = app(SHOP);
        with_env.spec.workloads[1]
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "A".into(),
            value: Some("1".into()),
            ..Default::default()
        }]);
        let with_env = build(&with_env, &Placement::default())[1]
            .deployment
            .clone();
        assert!(
            !up_to_date(&desired, &with_env),
            "the live object still has A=1"
        );
    }
}
