//! The Gateway API objects as Tandem's gateway reads them (Standard
//! channel, `gateway.networking.k8s.io/v1` and ReferenceGrant's `v1beta1`):
//! the fields it acts on, typed; everything else is ignored on read and
//! never written back (status is written by merge patch of `status` alone).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

macro_rules! resource {
    ($type:ident, $kind:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                GROUP.into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                $version.into()
            }
            fn api_version(_: &()) -> std::borrow::Cow<'_, str> {
                concat!("gateway.networking.k8s.io/", $version).into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A GatewayClass.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayClass {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: GatewayClassSpec,
    /// Status, as last written.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}
resource!(
    GatewayClass,
    "GatewayClass",
    "v1",
    "gatewayclasses",
    k8s_openapi::ClusterResourceScope
);

/// What a GatewayClass asks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    /// The implementation that owns the class.
    #[serde(default)]
    pub controller_name: String,
    /// Implementation parameters (Tandem takes none).
    #[serde(default)]
    pub parameters_ref: Option<serde_json::Value>,
}

/// A Gateway.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Gateway {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: GatewaySpec,
    /// Status, as last written.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}
resource!(
    Gateway,
    "Gateway",
    "v1",
    "gateways",
    k8s_openapi::NamespaceResourceScope
);

/// What a Gateway asks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Its class.
    #[serde(default)]
    pub gateway_class_name: String,
    /// Its listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Addresses it asks for.
    #[serde(default)]
    pub addresses: Vec<AddressRequest>,
    /// Infrastructure labels and annotations, parameters.
    #[serde(default)]
    pub infrastructure: Option<serde_json::Value>,
}

/// An address a Gateway asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AddressRequest {
    /// `IPAddress` (default), `Hostname`, or an implementation's type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The address (empty: any of that type).
    #[serde(default)]
    pub value: Option<String>,
}

/// One listener of a Gateway.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Name, unique in its Gateway.
    pub name: String,
    /// Host name (may start with `*.`); none: any.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Port.
    pub port: u16,
    /// `HTTP`, `HTTPS`, ...
    pub protocol: String,
    /// TLS settings (HTTPS).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Which routes may attach.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// TLS of a listener.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// `Terminate` (default) or `Passthrough`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Certificates (Secrets of type kubernetes.io/tls).
    #[serde(default)]
    pub certificate_refs: Vec<ObjectRef>,
}

/// A reference to an object by group, kind, namespace and name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    /// Group (`""`: core).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the referrer's).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Which routes may attach to a listener.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AllowedRoutes {
    /// From which namespaces.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// Which kinds (none: those of the protocol).
    #[serde(default)]
    pub kinds: Option<Vec<RouteGroupKind>>,
}

/// Namespaces whose routes may attach.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    /// With `Selector`: the namespaces' labels.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

/// A kind of route.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteGroupKind {
    /// Group (default: gateway.networking.k8s.io).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind.
    pub kind: String,
}

/// An HTTPRoute.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: HttpRouteSpec,
    /// Status, as written by every implementation (only the other
    /// implementations' parents are read back, to keep them).
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}
resource!(
    HttpRoute,
    "HTTPRoute",
    "v1",
    "httproutes",
    k8s_openapi::NamespaceResourceScope
);

/// What an HTTPRoute asks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The Gateways (and listeners) it attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names (may start with `*.`); none: those of the listener.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A route's reference to its parent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Group (default: gateway.networking.k8s.io).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind (default: Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace (default: the route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// A listener's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A listener's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// One rule of an HTTPRoute.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Its name (for status and metrics).
    #[serde(default)]
    pub name: Option<String>,
    /// Matches (none: `/` prefix).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to every request of the rule.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Backends with weights.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// One match of a rule.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path condition (default: prefix `/`).
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The path.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter condition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A filter of a rule or backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// Which filter.
    #[serde(rename = "type")]
    pub kind: String,
    /// `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// `URLRewrite`.
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
}

/// Headers to set, add and remove.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Replace or add.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove (names).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header's name and value.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A redirect answered by the gateway.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// A rewrite of the request before it goes upstream.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UrlRewrite {
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// How a path changes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// With `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// With `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// A backend of a rule.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// Group (`""`: core).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (default: Service).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's; another needs a ReferenceGrant).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port.
    #[serde(default)]
    pub port: Option<i32>,
    /// Weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters for requests sent to this backend.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

/// Timeouts of a rule (durations in Gateway API's format).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, from the gateway's view.
    #[serde(default)]
    pub request: Option<String>,
    /// One attempt at a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// A ReferenceGrant: who may refer to what in its namespace.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReferenceGrant {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}
resource!(
    ReferenceGrant,
    "ReferenceGrant",
    "v1beta1",
    "referencegrants",
    k8s_openapi::NamespaceResourceScope
);

/// What a ReferenceGrant allows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReferenceGrantSpec {
    /// Referrers.
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    /// Referents.
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

/// A referrer a grant allows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrantFrom {
    /// Group.
    #[serde(default)]
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
}

/// A referent a grant allows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrantTo {
    /// Group.
    #[serde(default)]
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Name (none: all of the kind).
    #[serde(default)]
    pub name: Option<String>,
}
