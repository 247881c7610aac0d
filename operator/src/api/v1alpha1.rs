//! `HybridApp` in `tandem.dev/v1alpha1`.
//!
//! Validation lives in the schema (types, ranges, patterns, list keys) and in
//! CEL rules that the API server evaluates, so a bad manifest is rejected at
//! `kubectl apply` with the offending field in the message. No field has a
//! schema default: the server stores exactly what the user wrote (GitOps tools
//! see no drift), and defaults are resolved in code ([`Scaling::resolve`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::{Duration, DurationOrAuto};

/// Largest number of workloads in one HybridApp (bounds CEL cost).
pub const MAX_WORKLOADS: usize = 16;
/// Largest number of routes in one HybridApp.
pub const MAX_ROUTES: usize = 64;
/// Largest number of backends in one route.
pub const MAX_BACKENDS: usize = 8;
/// Longest HybridApp name: `<app>-<workload>` names children and must stay a
/// 63-character DNS label.
pub const MAX_APP_NAME: usize = 32;
/// Longest workload name.
pub const MAX_WORKLOAD_NAME: usize = 30;
/// Shortest `scaleToZeroAfter`: below this a function flaps between requests.
pub const MIN_SCALE_TO_ZERO_AFTER_SECONDS: u64 = 10;

/// A HybridApp: one application whose HTTP routes are served by
/// scale-to-zero functions, always-on deployments, or a weighted split of both.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "HybridApp",
    plural = "hybridapps",
    singular = "hybridapp",
    namespaced,
    status = "HybridAppStatus",
    derive = "PartialEq",
    shortname = "happ",
    category = "tandem",
    doc = "A HybridApp declares which HTTP routes of an application run as scale-to-zero functions and which on always-on deployments, and how traffic splits between them.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Functions", type_ = "integer", json_path = ".status.functions", description = "Function workloads"),
    printcolumn(name = "At-Zero", type_ = "integer", json_path = ".status.functionsAtZero", description = "Function workloads scaled to zero"),
    printcolumn(name = "Always-On", type_ = "integer", json_path = ".status.alwaysOn", description = "AlwaysOn workloads"),
    printcolumn(name = "Routes", type_ = "integer", json_path = ".status.routeCount"),
    printcolumn(name = "Migrating", type_ = "string", json_path = ".status.migrations", description = "Routes whose migration has not ended"),
    printcolumn(name = "Saving", type_ = "string", json_path = ".status.saving", description = "What the app's replicas cost less than all-AlwaysOn at their minimums, over the last day"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Hosts", type_ = "string", json_path = ".spec.hosts", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 32 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name: a HybridApp name must be a DNS label of at most 32 characters that starts with a letter (it prefixes the names of its Deployments and Services)"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.routes.all(r, r.backends.all(b, self.workloads.exists(w, w.name == b.workload)))")
        .message("spec.routes[].backends[].workload: every backend must name a workload declared in spec.workloads[].name")
        .field_path(".routes"),
    validation = Rule::new("self.routes.all(a, self.routes.exists_one(b, b.match == a.match))")
        .message("spec.routes[].match: two routes have the same match; give each route a distinct path, methods or headers")
        .field_path(".routes"),
    validation = Rule::new("!has(self.gateway) || size(self.routes) <= 16")
        .message("spec.gateway: an HTTPRoute holds at most 16 rules, one per route; this app has more routes")
        .field_path(".gateway"),
)]
pub struct HybridAppSpec {
    /// Host names this app answers (exact match on the Host header, without
    /// port). Empty: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "hosts_schema")]
    pub hosts: Vec<String>,

    /// The workloads that serve this app: each becomes a Deployment and a
    /// Service. Names are unique.
    #[validate(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub workloads: Vec<Workload>,

    /// The HTTP routes: which requests go to which workloads, and in what
    /// proportion. The most specific match wins: exact path before the
    /// longest path prefix, then routes with methods or headers before
    /// routes without. Names are unique.
    #[validate(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub routes: Vec<Route>,

    /// Serve the routes through Gateways the cluster already runs: the
    /// operator then owns one Gateway API `HTTPRoute` named like the app,
    /// attached to these parents, with a rule per route and the effective
    /// weights as `backendRefs` to the workloads' public Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayOutput>,
}

/// Where the generated HTTPRoute attaches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayOutput {
    /// The Gateways (or their listeners) the HTTPRoute attaches to, as
    /// Gateway API `parentRefs`.
    #[validate(length(min = 1, max = 32))]
    pub parent_refs: Vec<ParentRef>,
}

/// A Gateway API `ParentReference` (Standard channel fields).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group of the parent (default `gateway.networking.k8s.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(max = 253))]
    pub group: Option<String>,
    /// Kind of the parent (default `Gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 63))]
    pub kind: Option<String>,
    /// Namespace of the parent (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Name of the parent.
    #[validate(length(min = 1, max = 253))]
    pub name: String,
    /// One listener of the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 253))]
    pub section_name: Option<String>,
    /// One port of the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// One workload: a pod template run as a Function (scales to zero) or
/// AlwaysOn (keeps at least one replica).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode == 'AlwaysOn' || !has(self.scaling) || !has(self.scaling.minReplicas) || self.scaling.minReplicas == 0 || (has(self.scaling.keepWarm) && self.scaling.keepWarm)")
        .message("scaling.minReplicas: a Function (or Auto) workload scales to zero, so minReplicas must be 0 unless scaling.keepWarm is true")
        .field_path(".scaling.minReplicas"),
    validation = Rule::new("self.mode != 'AlwaysOn' || !has(self.scaling) || !has(self.scaling.minReplicas) || self.scaling.minReplicas >= 1")
        .message("scaling.minReplicas: an AlwaysOn workload keeps at least 1 replica; use mode: Function to scale to zero")
        .field_path(".scaling.minReplicas"),
    validation = Rule::new("self.mode != 'AlwaysOn' || !has(self.scaling) || !has(self.scaling.scaleToZeroAfter)")
        .message("scaling.scaleToZeroAfter: only a Function (or Auto) workload scales to zero; remove it or use mode: Function")
        .field_path(".scaling.scaleToZeroAfter"),
    validation = Rule::new("self.mode == 'Function' || !has(self.scaling) || !has(self.scaling.keepWarm)")
        .message("scaling.keepWarm: only applies to a Function")
        .field_path(".scaling.keepWarm"),
    validation = Rule::new("self.mode == 'AlwaysOn' || !has(self.scaling) || !has(self.scaling.metric)")
        .message("scaling.metric: a Function always scales on concurrency; metric applies to AlwaysOn workloads")
        .field_path(".scaling.metric"),
    validation = Rule::new("self.mode == 'Auto' || !has(self.placement)")
        .message("placement: only applies with mode: Auto")
        .field_path(".placement"),
)]
pub struct Workload {
    /// Name of the workload, unique in this app: a DNS label of at most 30
    /// characters that starts with a letter. Children are named
    /// `<app>-<workload>`.
    #[validate(length(min = 1, max = 30))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("name: must be a DNS label: lowercase letters, digits and '-', starting with a letter and not ending with '-'"))]
    pub name: String,

    /// `Function`: scaled to and from zero by demand, with requests held while
    /// it starts. `AlwaysOn`: at least one replica at all times. `Auto`:
    /// Tandem decides from the observed traffic, a cold-start budget and
    /// replica cost whether it keeps a replica or may go to zero (see
    /// `placement` and `status.placements`).
    pub mode: Mode,

    /// With `mode: Auto`: the cold-start budget and dwell time the
    /// placement is decided with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,

    /// The container port that serves HTTP (1-65535).
    #[validate(range(min = 1, max = 65535))]
    pub port: i32,

    /// The pod template, exactly as in a Deployment: every container option
    /// works. Tandem adds its labels and the named port `http`.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,

    /// Scaling bounds and targets; every field has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,

    /// How long the gateway waits for this workload to answer, including a
    /// cold start; then it answers 504. Default 30s, at most 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('15m')")
        .message("requestTimeout: must be between 1s and 15m"))]
    pub request_timeout: Option<Duration>,
}

/// How a workload runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Scale-to-zero function: replicas follow demand, down to 0 when idle.
    Function,
    /// Always-on deployment: at least `minReplicas` (>= 1) replicas.
    AlwaysOn,
    /// Tandem places it: as a Function or keeping a replica, whichever the
    /// observed traffic, the cold-start budget and the replica's cost say.
    Auto,
}

impl Mode {
    /// Function or Auto: run the Function's way (reached through the
    /// gateways, held and woken at zero), whether or not it may go to zero
    /// right now.
    pub fn function_like(self) -> bool {
        self != Mode::AlwaysOn
    }

    /// The name as the spec writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Function => "Function",
            Mode::AlwaysOn => "AlwaysOn",
            Mode::Auto => "Auto",
        }
    }
}

/// How `mode: Auto` decides. Omitted fields take the defaults in their
/// descriptions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Highest share of requests that may meet a cold start, written like
    /// `1%` or `0.5%`. Run as a Function while its cold starts stay within
    /// this; keep a replica when they would not. Default `1%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(max = 8))]
    #[x_kube(validation = Rule::new("self.matches('^(100|[0-9]{1,2}(\\\\.[0-9]{1,3})?)%$')")
        .message("placement.coldStartBudget: must be a percent from 0% to 100%, such as 1% or 0.5%"))]
    pub cold_start_budget: Option<String>,

    /// Least time between two changes of placement, and the span of traffic
    /// each decision looks at (10s-24h). Default 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('24h')")
        .message("placement.minDwell: must be between 10s and 24h"))]
    pub min_dwell: Option<Duration>,
}

/// Default `placement.coldStartBudget`, percent.
pub const DEFAULT_COLD_START_BUDGET_PCT: f64 = 1.0;
/// Default `placement.minDwell`.
pub const DEFAULT_MIN_DWELL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl PlacementSpec {
    /// The budget in percent and the dwell, defaults filled in.
    pub fn resolve(spec: Option<&PlacementSpec>) -> (f64, std::time::Duration) {
        let budget = spec
            .and_then(|p| p.cold_start_budget.as_deref())
            .and_then(crate::migration::parse_percent)
            .unwrap_or(DEFAULT_COLD_START_BUDGET_PCT);
        let dwell = spec
            .and_then(|p| p.min_dwell.as_ref())
            .and_then(|d| d.to_std().ok())
            .unwrap_or(DEFAULT_MIN_DWELL);
        (budget, dwell)
    }
}

/// What an AlwaysOn workload scales on.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Metric {
    /// In-flight requests per replica, measured by the gateway (Tandem's
    /// autoscaler owns replicas).
    Concurrency,
    /// CPU utilisation (a HorizontalPodAutoscaler owns replicas).
    Cpu,
}

/// Scaling of one workload. Omitted fields take the defaults in their
/// descriptions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.minReplicas) ? self.minReplicas : 0) <= (has(self.maxReplicas) ? self.maxReplicas : 10)")
        .message("scaling.minReplicas: must not exceed scaling.maxReplicas (default 10)")
        .field_path(".minReplicas"),
    validation = Rule::new("!has(self.initialReplicas) || self.initialReplicas <= (has(self.maxReplicas) ? self.maxReplicas : 10)")
        .message("scaling.initialReplicas: must not exceed scaling.maxReplicas (default 10)")
        .field_path(".initialReplicas"),
    validation = Rule::new("!has(self.maxKeepAlive) || (has(self.scaleToZeroAfter) && self.scaleToZeroAfter == 'Auto')")
        .message("scaling.maxKeepAlive: only applies with scaleToZeroAfter: Auto")
        .field_path(".maxKeepAlive"),
)]
pub struct Scaling {
    /// Fewest replicas. Function: 0 (the default; above 0 only with
    /// `keepWarm: true`). AlwaysOn: at least 1, default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0, max = 1000))]
    pub min_replicas: Option<i32>,

    /// Most replicas (1-1000). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1000))]
    pub max_replicas: Option<i32>,

    /// Replicas started at once when a Function wakes from zero, before the
    /// autoscaler has measured anything (1-1000). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1000))]
    pub initial_replicas: Option<i32>,

    /// Target in-flight requests per replica (1-10000). Default 10 for a
    /// Function, 50 for AlwaysOn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 10000))]
    pub target_concurrency: Option<i32>,

    /// Function only: idle time (no request in flight or queued) before
    /// scaling to zero, written like `60s` or `5m` (at least 10s, at most
    /// 24h; default 60s), or `Auto`: Tandem learns from the workload's
    /// arrivals when to scale to zero after a request and when to pre-warm
    /// before the next one (timer-like traffic is recognised and pre-warmed
    /// for; see the README's "Letting traffic decide"), never keeping an
    /// idle replica longer than `maxKeepAlive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 'Auto' || (duration(self) >= duration('10s') && duration(self) <= duration('24h'))")
        .message("scaling.scaleToZeroAfter: must be Auto or between 10s and 24h (shorter makes a function flap between requests)"))]
    pub scale_to_zero_after: Option<DurationOrAuto>,

    /// With `scaleToZeroAfter: Auto`: the longest an idle replica is kept
    /// (10s-24h). Default 4h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('24h')")
        .message("scaling.maxKeepAlive: must be between 10s and 24h"))]
    pub max_keep_alive: Option<Duration>,

    /// Function only: allow `minReplicas` above 0 to keep warm replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_warm: Option<bool>,

    /// AlwaysOn only: `concurrency` (default; Tandem's autoscaler) or `cpu`
    /// (a HorizontalPodAutoscaler on CPU utilisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,

    /// AlwaysOn with `metric: cpu`: target average CPU utilisation in percent
    /// of requests (1-100). Default 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,
}

/// Scaling with every default filled in for a workload's mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedScaling {
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Replicas when waking from zero.
    pub initial_replicas: i32,
    /// Target in-flight requests per replica.
    pub target_concurrency: i32,
    /// Idle time before zero (Functions only); with `Auto`, the longest.
    pub scale_to_zero_after: Option<std::time::Duration>,
    /// `scaleToZeroAfter: Auto`: learn the keep-alive, at most this long.
    pub adaptive_keep_alive: Option<std::time::Duration>,
    /// What AlwaysOn scales on (`Concurrency` for Functions).
    pub metric: Metric,
    /// CPU target for `metric: cpu`.
    pub target_cpu_utilization: i32,
}

/// Default `maxReplicas`.
pub const DEFAULT_MAX_REPLICAS: i32 = 10;
/// Default `scaleToZeroAfter`.
pub const DEFAULT_SCALE_TO_ZERO_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// Default `maxKeepAlive`.
pub const DEFAULT_MAX_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(4 * 3600);
/// Default `requestTimeout`.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Scaling {
    /// Fills in the defaults for `mode` (see the field descriptions).
    pub fn resolve(scaling: Option<&Scaling>, mode: Mode) -> ResolvedScaling {
        let s = scaling.cloned().unwrap_or_default();
        let function = mode.function_like();
        let max_replicas = s.max_replicas.unwrap_or(DEFAULT_MAX_REPLICAS);
        let min_replicas = s.min_replicas.unwrap_or(if function { 0 } else { 1 });
        let adaptive = (function
            && s.scale_to_zero_after
                .as_ref()
                .is_some_and(DurationOrAuto::is_auto))
        .then(|| {
            s.max_keep_alive
                .as_ref()
                .and_then(|d| d.to_std().ok())
                .unwrap_or(DEFAULT_MAX_KEEP_ALIVE)
        });
        ResolvedScaling {
            min_replicas,
            max_replicas,
            initial_replicas: s
                .initial_replicas
                .unwrap_or(1)
                .max(min_replicas)
                .min(max_replicas),
            target_concurrency: s
                .target_concurrency
                .unwrap_or(if function { 10 } else { 50 }),
            scale_to_zero_after: function.then(|| {
                adaptive
                    .or_else(|| s.scale_to_zero_after.as_ref().and_then(|d| d.fixed()))
                    .unwrap_or(DEFAULT_SCALE_TO_ZERO_AFTER)
            }),
            adaptive_keep_alive: adaptive,
            metric: if function {
                Metric::Concurrency
            } else {
                s.metric.unwrap_or(Metric::Concurrency)
            },
            target_cpu_utilization: s.target_cpu_utilization.unwrap_or(80),
        }
    }
}

impl Workload {
    /// This workload's scaling with defaults filled in.
    pub fn scaling(&self) -> ResolvedScaling {
        Scaling::resolve(self.scaling.as_ref(), self.mode)
    }

    /// Whether callers of its public Service reach it through the gateways:
    /// a Function (held and woken from zero), or anything Tandem's
    /// autoscaler scales on the concurrency the gateways measure. An
    /// AlwaysOn workload scaled on CPU is reached directly.
    pub fn through_gateway(&self) -> bool {
        self.mode.function_like() || self.scaling().metric == Metric::Concurrency
    }

    /// The gateway's deadline for one request, including a cold start.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.request_timeout
            .as_ref()
            .and_then(|d| d.to_std().ok())
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }
}

/// One HTTP route: a match and the workloads that serve it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.backends.exists(b, !has(b.weight) || b.weight > 0)")
        .message("backends[].weight: at least one backend needs a weight above 0")
        .field_path(".backends"),
)]
pub struct Route {
    /// Name of the route, unique in this app (a DNS label).
    #[validate(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("name: must be a DNS label: lowercase letters, digits and '-', not starting or ending with '-'"))]
    pub name: String,

    /// Which requests this route takes.
    #[serde(rename = "match")]
    pub matches: RouteMatch,

    /// The workloads that serve it. With several, requests split by weight.
    /// Each workload appears at most once.
    #[validate(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["workload".into()]))]
    pub backends: Vec<Backend>,

    /// How a change of the weights reaches traffic. Without it a change
    /// applies to the next request; with it the route moves in steps, each
    /// measured by the gateways and passed or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// A stepped move of a route's traffic from the weights it has to the weights
/// the spec asks for: pre-warm the destination, shift a step, measure, pass
/// or roll back.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.steps.all(s, s >= 1 && s <= 100) && self.steps[size(self.steps) - 1] == 100")
        .message("migration.steps: each step is a percent of the change from 1 to 100, and the last step is 100")
        .field_path(".steps"),
    validation = Rule::new("self.steps.isSorted() && self.steps.all(s, self.steps.exists_one(t, t == s))")
        .message("migration.steps: steps must increase, each one larger than the one before (for example [5, 25, 50, 100])")
        .field_path(".steps"),
)]
pub struct Migration {
    /// Share of the change applied at each step, in percent, increasing and
    /// ending at 100: `[5, 25, 50, 100]` moves 5% of the change first.
    #[validate(length(min = 1, max = 20))]
    pub steps: Vec<i32>,

    /// How long each step runs before its gate is judged (1s-1h). Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('1h')")
        .message("migration.stepInterval: must be between 1s and 1h"))]
    pub step_interval: Option<Duration>,

    /// What a step must show to pass, measured by the gateways on the
    /// backends that gain traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,

    /// How long the destination is kept warm after a rollback (0s-24h).
    /// Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('24h')")
        .message("migration.rollbackGrace: must be at most 24h"))]
    pub rollback_grace: Option<Duration>,

    /// How long one step may wait for its replicas to be ready or for
    /// enough requests before the migration is `Stalled` (1s-24h). Default
    /// 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')")
        .message("migration.progressDeadline: must be between 1s and 24h"))]
    pub progress_deadline: Option<Duration>,
}

/// The gate of each step. Every limit that is set must hold over the step.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Highest share of 5xx answers (the backend's, and the gateway's own
    /// 502/503/504), written like `1%` or `0.5%`. Default `1%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(max = 8))]
    #[x_kube(validation = Rule::new("self.matches('^(100|[0-9]{1,2}(\\\\.[0-9]{1,3})?)%$')")
        .message("analysis.maxErrorRate: must be a percent from 0% to 100%, such as 1% or 0.5%"))]
    pub max_error_rate: Option<String>,

    /// Highest 99th percentile of the time to the end of the response.
    /// Unset: not judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_latency: Option<Duration>,

    /// Highest 99th percentile of the time requests were held waiting for a
    /// replica (a cold start). Unset: not judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cold_wait: Option<Duration>,

    /// Fewest requests a step needs before it can pass (1-1000000); with
    /// fewer the step holds. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 1, max = 1000000))]
    pub min_requests: Option<i32>,
}

/// What a request must look like to take a route. Set exactly one of `path`
/// and `pathPrefix`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.path) != has(self.pathPrefix)")
        .message("match: set exactly one of path (exact) or pathPrefix"),
)]
pub struct RouteMatch {
    /// Match paths under this prefix, segment by segment: `/api` matches
    /// `/api` and `/api/users` but not `/apiary`. `/` matches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('?') && !self.contains('#')")
        .message("match.pathPrefix: must start with '/' and hold no '?' or '#'"))]
    pub path_prefix: Option<String>,

    /// Match exactly this path (it wins over any prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('?') && !self.contains('#')")
        .message("match.path: must start with '/' and hold no '?' or '#'"))]
    pub path: Option<String>,

    /// Only these HTTP methods. Empty: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[validate(length(max = 9))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub methods: Vec<Method>,

    /// Only requests that carry all these headers with exactly these values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[validate(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub headers: Vec<HeaderMatch>,
}

/// An HTTP method.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
}

/// A header that must be present with an exact value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    #[validate(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&\\'*+.^_`|~-]+$')")
        .message("headers[].name: must be an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"))]
    pub name: String,
    /// Exact value.
    #[validate(length(max = 4096))]
    pub value: String,
}

/// A workload serving a route, with its share of traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Name of a workload in `spec.workloads`.
    #[validate(length(min = 1, max = 30))]
    pub workload: String,
    /// Relative weight (0-1000). Default 1. A backend gets
    /// weight / (sum of weights) of the route's requests; 0 sends it none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[validate(range(min = 0, max = 1000))]
    pub weight: Option<i32>,
}

impl Backend {
    /// The weight with its default.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1).max(0) as u32
    }
}

/// What Tandem observed and did.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HybridAppStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing` and `Degraded` (plus `Reconciling` and
    /// `Stalled`, following kstatus), and `Autoscaled`: the autoscaler's
    /// latest decisions, or why it holds the current scale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Per-workload state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub workloads: Vec<WorkloadStatus>,

    /// Per-route effective weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub routes: Vec<RouteStatus>,

    /// Number of Function workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<i32>,
    /// Number of Function workloads at zero replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions_at_zero: Option<i32>,
    /// Number of AlwaysOn workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_on: Option<i32>,
    /// Number of routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_count: Option<i32>,
    /// Routes whose migration has not ended, like `search Progressing 25%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<String>,

    /// Where `mode: Auto` placed each of its workloads, and the numbers
    /// the placement was decided on (written by the autoscaler).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["workload"]))]
    pub placements: Vec<PlacementStatus>,

    /// What each workload's replicas cost over the last hour and day at the
    /// operator's prices, beside all-AlwaysOn at its minimum (written by the
    /// autoscaler every `--cost-refresh`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["workload"]))]
    pub costs: Vec<WorkloadCost>,

    /// What the app's replicas cost less than all-AlwaysOn, over the last
    /// day, like `62%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saving: Option<String>,
}

/// The cost of one workload.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCost {
    /// Workload name.
    pub workload: String,
    /// Over the last hour.
    pub last_hour: CostFigures,
    /// Over the last day.
    pub last_day: CostFigures,
}

/// Replica-hours and costs over one window.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CostFigures {
    /// Hours of the window watched (less after the operator's leader
    /// changed).
    pub observed_hours: f64,
    /// Replica-hours run.
    pub replica_hours: f64,
    /// Their cost.
    pub cost: f64,
    /// What all-AlwaysOn at the workload's minimum would have cost.
    pub always_on_cost: f64,
}

/// The placement of one `mode: Auto` workload. The figures are those of
/// the workload run as a Function (its keep-alive replayed on its traffic)
/// over the last `placement.minDwell`; costs at the operator's prices.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Workload name.
    pub workload: String,
    /// `Function` (may go to zero) or `AlwaysOn` (keeps a replica).
    pub placement: crate::keepalive::placement::Placement,
    /// When it was placed so.
    pub since: Time,
    /// Requests that would meet a cold start as a Function, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_percent: Option<f64>,
    /// The budget for them, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_budget_percent: Option<f64>,
    /// Hours of traffic the figures cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_hours: Option<f64>,
    /// Replica-hours a Function would have been loaded in them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_replica_hours: Option<f64>,
    /// Cost of those replica-hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_cost: Option<f64>,
    /// Cost of one replica kept all the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_on_cost: Option<f64>,
    /// What a Function saves against always on, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saving_percent: Option<f64>,
    /// Why, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of one workload.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// Workload name.
    pub name: String,
    /// Its mode.
    pub mode: Mode,
    /// Desired replicas.
    pub replicas: i32,
    /// Ready replicas.
    pub ready_replicas: i32,
    /// Summary state.
    pub state: WorkloadState,
    /// Why it is in this state, or the last scaling decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Summary state of a workload.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadState {
    /// A Function with no replicas, waiting for demand.
    ScaledToZero,
    /// Replicas are wanted but not all are ready yet.
    Starting,
    /// All wanted replicas are ready.
    Ready,
    /// Something is wrong; see the message.
    Degraded,
}

/// Effective traffic split of one route: what the gateways apply.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// Route name.
    pub name: String,
    /// Percent of requests per workload. Equal to the spec's weights unless
    /// a migration is under way or was rolled back.
    pub weights: BTreeMap<String, i32>,
    /// The route's latest migration, while it runs and after it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// Where a route's migration stands. Everything a new leader needs to resume
/// it is here.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Where it stands.
    pub phase: MigrationPhase,
    /// The step under way, 1-based (0 while pre-warming for the first).
    pub step: i32,
    /// Percent of the change the current step applies.
    pub step_weight: i32,
    /// Percent of the change in traffic now: the previous step's while a
    /// step pre-warms, 0 after a rollback, 100 once it succeeded. The
    /// gateways split by `baseline × (100 − applied) + target × applied`.
    pub applied: i32,
    /// When the current step (or its pre-warm) began.
    pub step_started: Time,
    /// When the migration began.
    pub started: Time,
    /// The weights it started from (and rolls back to).
    pub baseline: BTreeMap<String, i32>,
    /// The weights it moves to: the spec's.
    pub target: BTreeMap<String, i32>,
    /// Replicas each destination is held at, at least, while the migration
    /// runs (and, after a rollback, until `warmUntil`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prewarm: BTreeMap<String, i32>,
    /// After a rollback: when the destination may scale down again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_until: Option<Time>,
    /// Why it is in this phase, with the figures.
    pub message: String,
    /// The latest judgement of a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisStatus>,
}

/// Phase of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Waiting for the destination's replicas before a step.
    PreWarming,
    /// A step is under way.
    Progressing,
    /// Held by the `migration.tandem.dev/<route>: pause` annotation.
    Paused,
    /// A step could not progress before its deadline (see the message).
    Stalled,
    /// Reached the target.
    Succeeded,
    /// A gate failed; back at the baseline until the spec changes.
    RolledBack,
    /// Stopped by the `abort` annotation; back at the baseline until the
    /// spec changes.
    Aborted,
}

/// Figures of one step's judgement, summed over gateway replicas, for the
/// backends that gain traffic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// The step judged.
    pub step: i32,
    /// When.
    pub time: Time,
    /// Seconds of traffic measured.
    pub window_seconds: i64,
    /// Requests measured.
    pub requests: i64,
    /// Of which 5xx.
    pub errors: i64,
    /// `errors / requests`, like `0.4%`.
    pub error_rate: String,
    /// 99th percentile of response time, in milliseconds.
    pub p99_latency_ms: i64,
    /// Requests that were held for a cold start.
    pub cold_waits: i64,
    /// 99th percentile of their wait, in milliseconds.
    pub p99_cold_wait_ms: i64,
    /// `Passed`, `Failed` or `TooFewRequests`.
    pub result: String,
}

/// Schema of `hosts`: a set of at most 16 lowercase DNS names.
fn hosts_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Host names this app answers (exact match on the Host header, without port). Empty: any host.",
        "type": "array",
        "maxItems": 16,
        "x-kubernetes-list-type": "set",
        "items": {"type": "string", "minLength": 1, "maxLength": 253},
        "x-kubernetes-validations": [{
            "rule": "self.all(h, h.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'))",
            "message": "hosts[]: each host must be a lowercase DNS name such as shop.example.com (no scheme, port or wildcard)"
        }]
    })
}

/// Schema of `template`: an object whose `spec.containers` is a non-empty
/// list of named containers; everything else is kept as written and checked by
/// the API server when Tandem applies the Deployment. The full PodTemplateSpec
/// schema would make the CRD too large for client-side `kubectl apply`.
fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The pod template, exactly as in a Deployment (metadata and spec): every container option works. Tandem adds its labels and the named port `http`.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["spec"],
        "properties": {
            "metadata": {
                "description": "Labels and annotations of the pods.",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "description": "The pod spec (a Kubernetes PodSpec).",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "description": "Containers of the pod; the first one serves `port`.",
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 16,
                        "items": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": true,
                            "required": ["name", "image"],
                            "properties": {
                                "name": {"type": "string", "description": "Container name."},
                                "image": {"type": "string", "description": "Container image."}
                            }
                        }
                    }
                }
            }
        }
    })
}
