//! Tandem's gateway as a Gateway API implementation: the objects it reads
//! ([`model`]), how routes attach to listeners and what status each object
//! gets ([`attach`], pure), host name rules ([`hostname`]) and certificates
//! ([`tls`]).

pub mod attach;
pub mod hostname;
pub mod model;
#[cfg(test)]
mod tests;
pub mod tls;

/// The controller name of Tandem's GatewayClasses (the default of
/// `--gateway-controller-name`).
pub const CONTROLLER_NAME: &str = "tandem.dev/gateway";

/// The HTTPRoute filters Tandem serves; a route using another is not
/// accepted (`UnsupportedValue`).
pub const SUPPORTED_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
];
