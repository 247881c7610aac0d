//! Tandem's gateway as a Gateway API implementation: the objects it reads
//! ([`model`]), how routes attach to listeners and what status each object
//! gets ([`attach`], pure), host name rules ([`hostname`]) and certificates
//! ([`tls`]).

pub mod attach;
pub mod hostname;
pub mod model;
pub mod serve;
pub mod status;
#[cfg(test)]
mod tests;
pub mod tls;

/// The controller name of Tandem's GatewayClasses (the default of
/// `--gateway-controller-name` in the chart and testenv).
pub const CONTROLLER_NAME: &str = "tandem.dev/gateway";

/// The HTTPRoute filters Tandem serves on a rule; a route using another (or
/// any filter on a backendRef) is not accepted (`UnsupportedValue`).
pub const SUPPORTED_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
];

/// The Gateway API features Tandem claims (in GatewayClass status, which
/// `testenv/conformance.sh` hands to the conformance suite): the
/// GATEWAY-HTTP core and the extended features that pass it.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "Gateway",
    "HTTPRoute",
    "ReferenceGrant",
    "HTTPRouteResponseHeaderModification",
    "HTTPRoutePathRedirect",
    "HTTPRoutePortRedirect",
    "HTTPRouteSchemeRedirect",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteHostRewrite",
    "HTTPRoutePathRewrite",
    "HTTPRouteRequestTimeout",
    "HTTPRouteBackendTimeout",
];

/// Parses `--gateway-addresses`: addresses and IPv4 CIDR ranges (at most
/// 4096 addresses in all; a range gives its addresses in order, without
/// its network address).
pub fn parse_addresses(text: &str) -> Result<AddressPool, String> {
    let mut addresses = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('/') {
            None => addresses.push(
                part.parse()
                    .map_err(|e| format!("{part}: not an address ({e})"))?,
            ),
            Some((base, bits)) => {
                let base: std::net::Ipv4Addr = base
                    .parse()
                    .map_err(|e| format!("{part}: not an IPv4 range ({e})"))?;
                let bits: u32 = bits
                    .parse()
                    .ok()
                    .filter(|b| (20..=32).contains(b))
                    .ok_or_else(|| format!("{part}: the prefix must be /20 to /32"))?;
                let size = 1u32 << (32 - bits);
                let start = u32::from(base) & !(size - 1);
                let first = if size > 1 { 1 } else { 0 };
                for offset in first..size {
                    addresses.push(std::net::IpAddr::V4((start + offset).into()));
                }
            }
        }
    }
    if addresses.len() > 4096 {
        return Err("more than 4096 addresses".into());
    }
    Ok(AddressPool(addresses))
}

/// The addresses Tandem's Gateways are given, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPool(pub Vec<std::net::IpAddr>);
