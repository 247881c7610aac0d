//! The headers the gateway owns on a request's way upstream, one policy for
//! HTTP/1 and HTTP/2 clients.
//!
//! - Hop-by-hop headers (`Connection` and the names it lists, `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//!   `HTTP2-Settings`, `Proxy-Authorization`) and `Expect` (the gateway
//!   answers `100-continue` itself) never go upstream. `Connection` cannot
//!   remove `Host`: a name it lists is dropped, but `Host` and the headers
//!   below are the gateway's to write, so listing them changes nothing.
//! - `Content-Length` and `Transfer-Encoding` are written by the gateway for
//!   the body it sends (see [`super::h1::body`]).
//! - `X-Forwarded-For`: the client's value, if any, with the client's
//!   address appended. Only the last entry is the gateway's word.
//! - `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Forwarded-Port`,
//!   `Forwarded` and `X-Real-IP` are believed only from a client inside a
//!   `--trust-forwarded-from` range (a load balancer in front of the
//!   gateway): from anyone else they are removed, and `X-Forwarded-Proto` is
//!   set to the listener's scheme.
//! - `X-Request-Id`: kept when the client sent one that looks like an id
//!   (1 to 128 characters of letters, digits and `-_.:/+=`), otherwise a new
//!   one; so every request upstream carries exactly one.
//! - `traceparent`: with trace export on, the gateway's own (its request
//!   span, a child of the client's) replaces the client's; `tracestate`
//!   goes on unchanged. With it off, both go on as they came.
//! - `Upgrade` is forwarded only for a websocket handshake; `h2c` and any
//!   other protocol are never offered to a backend.

use std::net::IpAddr;

use super::state::request_id;

/// A range of client addresses (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text}: not an IP address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

/// Who sent a request and how it arrived, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The client's address as text.
    pub ip: &'a str,
    /// Whether its own forwarding headers are believed.
    pub trusted: bool,
    /// The listener's scheme (`http`).
    pub scheme: &'static str,
}

/// What becomes of one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// Sent on as it is.
    Forward,
    /// Not sent.
    Drop,
    /// A previous `X-Forwarded-For`, appended to.
    ForwardedFor,
    /// The client's request id.
    RequestId,
    /// The client's `X-Forwarded-Proto`, when it is believed.
    ForwardedProto,
    /// The client's `traceparent`: replaced when the gateway traces.
    TraceParent,
}

fn is(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted)
}

/// Headers that belong to one connection only.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    "proxy-authorization",
];

/// Whether `name` is one of [`HOP_BY_HOP`] (compared by length first: this
/// runs for every header of every request and response).
pub fn hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => is(name, "te"),
        7 => is(name, "trailer") || is(name, "upgrade"),
        10 => is(name, "connection") || is(name, "keep-alive"),
        14 => is(name, "http2-settings"),
        16 => is(name, "proxy-connection"),
        17 => is(name, "transfer-encoding"),
        19 => is(name, "proxy-authorization"),
        _ => false,
    }
}

fn disposition(name: &str, peer: &Peer<'_>, connection_named: &[&[u8]]) -> Disposition {
    // Written by the gateway (Host, framing) or answered by it (Expect).
    let gateways = match name.len() {
        4 => is(name, "host"),
        6 => is(name, "expect"),
        14 => is(name, "content-length"),
        _ => false,
    };
    if gateways
        || hop_by_hop(name)
        || connection_named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    {
        return Disposition::Drop;
    }
    match name.len() {
        15 if is(name, "x-forwarded-for") => Disposition::ForwardedFor,
        12 if is(name, "x-request-id") => Disposition::RequestId,
        11 if is(name, "traceparent") => Disposition::TraceParent,
        17 if is(name, "x-forwarded-proto") => {
            if peer.trusted {
                Disposition::ForwardedProto
            } else {
                Disposition::Drop
            }
        }
        // Only a trusted client says where a request came from.
        9 | 16
            if !peer.trusted
                && (is(name, "forwarded")
                    || is(name, "x-real-ip")
                    || is(name, "x-forwarded-host")
                    || is(name, "x-forwarded-port")) =>
        {
            Disposition::Drop
        }
        _ => Disposition::Forward,
    }
}

/// Whether a client's request id is kept.
fn plausible_request_id(value: &[u8]) -> bool {
    (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
}

/// Request headers, however the request was parsed.
pub trait Headers {
    /// Calls `f` with every header, in order.
    fn each(&self, f: &mut dyn FnMut(&str, &[u8]));
}

impl Headers for [httparse::Header<'_>] {
    fn each(&self, f: &mut dyn FnMut(&str, &[u8])) {
        for header in self {
            f(header.name, header.value);
        }
    }
}

impl Headers for http::HeaderMap {
    fn each(&self, f: &mut dyn FnMut(&str, &[u8])) {
        for (name, value) in self {
            f(name.as_str(), value.as_bytes());
        }
    }
}

/// What the request says beyond its headers, for writing its head upstream.
pub struct RequestLine<'a> {
    /// Method.
    pub method: &'a str,
    /// Path and query, as the upstream gets it.
    pub target: &'a str,
    /// The `Host` for the upstream (the client's, or the authority of an
    /// absolute target).
    pub host: Option<&'a [u8]>,
    /// Header names the client's `Connection` lists.
    pub connection_named: &'a [&'a [u8]],
    /// A websocket handshake: `Upgrade: websocket` goes on.
    pub websocket: bool,
    /// The route's edits of the request's headers.
    pub edits: Option<&'a super::filters::HeaderEdits>,
    /// The gateway's `traceparent` in place of the client's (the request
    /// is traced).
    pub traceparent: Option<&'a [u8]>,
}

/// Writes the request line and headers for the upstream into `out`
/// (HTTP/1.1, without framing headers and the final empty line).
pub fn write_request_head(
    out: &mut Vec<u8>,
    line: &RequestLine<'_>,
    headers: &(impl Headers + ?Sized),
    peer: &Peer<'_>,
) {
    out.clear();
    out.extend_from_slice(line.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(line.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = line.host {
        push_header(out, b"host", host);
    }
    let mut forwarded_for: Vec<u8> = Vec::new();
    let mut proto = false;
    let mut id = false;
    headers.each(
        &mut |name, value| match disposition(name, peer, line.connection_named) {
            Disposition::Drop => {}
            Disposition::Forward => {
                if !line.edits.is_some_and(|e| e.drops(name)) {
                    push_header(out, name.as_bytes(), value)
                }
            }
            Disposition::ForwardedFor => {
                forwarded_for.extend_from_slice(value);
                forwarded_for.extend_from_slice(b", ");
            }
            Disposition::RequestId => {
                if !id && plausible_request_id(value) {
                    id = true;
                    push_header(out, b"x-request-id", value);
                }
            }
            Disposition::ForwardedProto => {
                if !proto {
                    proto = true;
                    push_header(out, b"x-forwarded-proto", value);
                }
            }
            Disposition::TraceParent => {
                if line.traceparent.is_none() && !line.edits.is_some_and(|e| e.drops(name)) {
                    push_header(out, name.as_bytes(), value)
                }
            }
        },
    );
    if let Some(edits) = line.edits {
        edits.each_written(|name, value| push_header(out, name.as_bytes(), value));
    }
    if line.websocket {
        push_header(out, b"connection", b"upgrade");
        push_header(out, b"upgrade", b"websocket");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(&forwarded_for);
    out.extend_from_slice(peer.ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !proto {
        push_header(out, b"x-forwarded-proto", peer.scheme.as_bytes());
    }
    if !id {
        push_header(out, b"x-request-id", &request_id());
    }
    if let Some(traceparent) = line.traceparent {
        push_header(out, b"traceparent", traceparent);
    }
}

/// Appends `name: value` and CRLF.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)], trusted: bool, named: &[&[u8]]) -> String {
        traced_head(headers, trusted, named, None)
    }

    fn traced_head(
        headers: &[(&str, &str)],
        trusted: bool,
        named: &[&[u8]],
        traceparent: Option<&[u8]>,
    ) -> String {
        let parsed: Vec<httparse::Header<'_>> = headers
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect();
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &RequestLine {
                method: "GET",
                target: "/x",
                host: Some(b"shop"),
                connection_named: named,
                websocket: false,
                edits: None,
                traceparent,
            },
            &parsed[..],
            &Peer {
                ip: "10.0.0.9",
                trusted,
                scheme: "http",
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_traced_request_carries_the_gateways_traceparent_only() {
        let ours = b"00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
        let client = [
            (
                "TraceParent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=1"),
        ];
        let text = traced_head(&client, false, &[], Some(ours));
        assert_eq!(
            text.to_lowercase().matches("traceparent:").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains(
                "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("tracestate: vendor=1\r\n"), "{text}");
        // Untraced, the client's goes on as it came.
        let untraced = head(&client, false, &[]);
        assert!(
            untraced
                .contains("TraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "{untraced}"
        );
    }

    #[test]
    fn an_untrusted_client_cannot_say_where_the_request_came_from() {
        let sent = head(
            &[
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=1.2.3.4;proto=https"),
                ("X-Forwarded-Host", "evil"),
                ("X-Real-IP", "1.2.3.4"),
                ("X-Forwarded-Port", "443"),
                ("X-Forwarded-For", "1.2.3.4"),
                ("Accept", "*/*"),
            ],
            false,
            &[],
        );
        assert_eq!(
            sent,
            "GET /x HTTP/1.1\r\nhost: shop\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-request-id: "
                .to_string() + &sent[sent.len() - 34..]
        );
        let trusted = head(
            &[
                ("X-Forwarded-Proto", "https"),
                ("X-Real-IP", "1.2.3.4"),
                ("X-Request-Id", "abc-1"),
            ],
            true,
            &[],
        );
        assert!(trusted.contains("X-Real-IP: 1.2.3.4\r\n"), "{trusted}");
        assert!(
            trusted.contains("x-forwarded-proto: https\r\n"),
            "{trusted}"
        );
        assert!(
            !trusted.contains("x-forwarded-proto: http\r\n"),
            "{trusted}"
        );
        assert!(trusted.contains("x-request-id: abc-1\r\n"), "{trusted}");
    }

    #[test]
    fn connection_cannot_strip_what_the_gateway_writes() {
        let named: [&[u8]; 4] = [b"host", b"x-request-id", b"x-forwarded-proto", b"x-secret"];
        let sent = head(
            &[
                ("Host", "shop"),
                // Not hex, so a generated id can never contain it.
                ("X-Request-Id", "client-zzz"),
                ("X-Secret", "1"),
                ("Keep-Alive", "5"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
                ("Expect", "100-continue"),
                ("Content-Length", "3"),
            ],
            false,
            &named,
        );
        assert!(sent.contains("host: shop\r\n"), "{sent}");
        assert_eq!(sent.matches("x-request-id: ").count(), 1, "{sent}");
        assert!(!sent.contains("zzz"), "named in Connection: {sent}");
        assert!(sent.contains("x-forwarded-proto: http\r\n"), "{sent}");
        for gone in [
            "X-Secret",
            "Keep-Alive",
            "Upgrade",
            "HTTP2-Settings",
            "Expect",
            "Content-Length",
        ] {
            assert!(!sent.contains(gone), "{gone} forwarded: {sent}");
        }
    }

    #[test]
    fn request_ids_that_do_not_look_like_ids_are_replaced() {
        let sent = head(
            &[("X-Request-Id", "a b"), ("X-Request-Id", "second")],
            false,
            &[],
        );
        assert_eq!(sent.matches("x-request-id: ").count(), 1, "{sent}");
        assert!(sent.contains("x-request-id: second\r\n"), "{sent}");
        let long = "a".repeat(129);
        let sent = head(&[("X-Request-Id", &long)], false, &[]);
        assert!(!sent.contains(&long));
    }

    #[test]
    fn cidr_ranges_match_their_addresses() {
        let v4: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(v4.contains("10.1.200.3".parse().unwrap()));
        assert!(!v4.contains("10.2.0.1".parse().unwrap()));
        assert!(
            v4.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("shop".parse::<Cidr>().is_err());
    }
}
