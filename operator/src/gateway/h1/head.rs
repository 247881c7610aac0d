//! Request and response heads of HTTP/1.x: parsed in place with `httparse`
//! and rewritten for the other side straight into a byte buffer.

use std::mem::MaybeUninit;

use http::StatusCode;
use http::header::HeaderName;

use super::body::Framing;
use crate::gateway::proxy::{
    HOP_BY_HOP, X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID, request_id,
};

/// Headers parsed on the stack; more than this (if allowed) go to the heap.
const STACK_HEADERS: usize = 100;
/// Most headers of an upstream response.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// Why a request head cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    /// 400, 431 or 501.
    pub status: StatusCode,
    /// What was wrong.
    pub message: &'static str,
}

fn reject(status: StatusCode, message: &'static str) -> Rejection {
    Rejection { status, message }
}

/// What the proxy needs to know of a client's request, its head already
/// rewritten for the upstream.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head in the client buffer.
    pub len: usize,
    /// How its body is delimited.
    pub framing: Framing,
    /// The client lets the connection stay open after this request.
    pub keep_alive: bool,
    /// The client speaks HTTP/1.0 (no chunked responses).
    pub http10: bool,
    /// A HEAD request: the response has no body.
    pub head: bool,
    /// Safe to send twice (RFC 9110 idempotent methods).
    pub idempotent: bool,
    /// Asks for a protocol upgrade (websocket).
    pub upgrade: bool,
    /// Sent `Expect: 100-continue` and a body: waits for "100 Continue".
    pub expect_continue: bool,
}

/// The parts of a request a route looks at.
pub struct RouteInput<'a> {
    /// Host header, or the authority of an absolute-form target.
    pub host: Option<&'a str>,
    /// Path without the query.
    pub path: &'a str,
    /// Method.
    pub method: &'a str,
    /// All headers.
    pub headers: &'a [httparse::Header<'a>],
}

/// Parses the request head at the start of `buf`. On success writes the
/// head to send upstream into `out` (without framing headers and the final
/// empty line: see [`finish_request_head`]) and calls `route` with what
/// routing needs. `Ok(None)`: the head is not complete yet.
pub fn parse_request<R>(
    buf: &[u8],
    max_headers: usize,
    client_ip: &str,
    out: &mut Vec<u8>,
    route: impl FnOnce(&RouteInput<'_>) -> R,
) -> Result<Option<(RequestHead, R)>, Rejection> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let storage: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, storage) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers",
            ));
        }
        Err(_) => return Err(reject(StatusCode::BAD_REQUEST, "malformed request head")),
    };
    let method = request.method.expect("a complete head has a method");
    let target = request.path.expect("a complete head has a target");
    let http10 = request.version == Some(0);
    let headers: &[httparse::Header<'_>] = request.headers;

    let mut info = HeaderInfo::default();
    for header in headers {
        info.note(header)?;
    }
    if info.chunked && info.content_length.is_some() {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if info.transfer_encoding && (!info.chunked || http10) {
        return Err(reject(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported Transfer-Encoding",
        ));
    }
    let (authority, path) = split_target(target)?;
    let host = info.host.or(authority);
    let framing = match (info.chunked, info.content_length) {
        (true, _) => Framing::Chunked,
        (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    let upgrade = info.upgrade.is_some() && info.connection_upgrade && !http10;
    let head = RequestHead {
        len,
        framing,
        keep_alive: if http10 {
            info.connection_keep_alive
        } else {
            !info.connection_close
        },
        http10,
        head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        upgrade,
        expect_continue: info.expect_continue && !framing.is_empty(),
    };
    let routed = route(&RouteInput {
        host,
        path: path.split_once('?').map_or(path, |(p, _)| p),
        method,
        headers,
    });

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for header in headers {
        if !info.forwards(header.name) {
            continue;
        }
        push_header(out, header.name.as_bytes(), header.value);
    }
    if info.host.is_none()
        && let Some(authority) = authority
    {
        push_header(out, b"host", authority.as_bytes());
    }
    if upgrade {
        push_header(out, b"connection", b"upgrade");
        push_header(out, b"upgrade", info.upgrade.unwrap_or_default());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for previous in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(X_FORWARDED_FOR.as_str()))
    {
        out.extend_from_slice(previous.value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !info.forwarded_proto {
        push_header(out, b"x-forwarded-proto", b"http");
    }
    if !info.request_id {
        push_header(out, b"x-request-id", &request_id());
    }
    Ok(Some((head, routed)))
}

/// Ends a request head written by [`parse_request`] with the framing of the
/// body that will follow.
pub fn finish_request_head(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `/path?q` as it is, or `http://authority/path?q` split into its parts.
fn split_target(target: &str) -> Result<(Option<&str>, &str), Rejection> {
    if target.starts_with('/') {
        return Ok((None, target));
    }
    let scheme = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"));
    let Some(_) = scheme else {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "request target must be a path or an http:// URL",
        ));
    };
    let rest = &target[7..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "request target has no host",
        ));
    }
    Ok((Some(authority), if path.is_empty() { "/" } else { path }))
}

fn is(name: &str, wanted: &HeaderName) -> bool {
    name.eq_ignore_ascii_case(wanted.as_str())
}

fn hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| is(name, h))
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// What the headers of a request say about framing and forwarding.
#[derive(Default)]
struct HeaderInfo<'a> {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    host: Option<&'a str>,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_upgrade: bool,
    /// Other header names listed in `Connection` (hop-by-hop too).
    connection_named: Vec<&'a [u8]>,
    upgrade: Option<&'a [u8]>,
    expect_continue: bool,
    forwarded_proto: bool,
    request_id: bool,
}

impl<'a> HeaderInfo<'a> {
    fn note(&mut self, header: &httparse::Header<'a>) -> Result<(), Rejection> {
        let (name, value) = (header.name, header.value);
        if is(name, &http::header::CONTENT_LENGTH) {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "invalid Content-Length"))?;
            if self.content_length.is_some_and(|m| m != n) {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "conflicting Content-Length",
                ));
            }
            self.content_length = Some(n);
        } else if is(name, &http::header::TRANSFER_ENCODING) {
            self.transfer_encoding = true;
            // Only `chunked`, once, as the last coding is supported.
            self.chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked") && !self.chunked;
        } else if is(name, &http::header::HOST) {
            if self.host.is_some() {
                return Err(reject(StatusCode::BAD_REQUEST, "more than one Host header"));
            }
            self.host = std::str::from_utf8(value).ok();
        } else if is(name, &http::header::CONNECTION) {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.connection_keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.connection_upgrade = true;
                } else if !token.is_empty() {
                    self.connection_named.push(token);
                }
            }
        } else if is(name, &http::header::UPGRADE) {
            self.upgrade = Some(value);
        } else if is(name, &http::header::EXPECT) {
            self.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if is(name, &X_FORWARDED_PROTO) {
            self.forwarded_proto = true;
        } else if is(name, &X_REQUEST_ID) {
            self.request_id = true;
        }
        Ok(())
    }

    /// Whether a header goes upstream as it is (the others are hop-by-hop,
    /// rewritten, or answered by the gateway).
    fn forwards(&self, name: &str) -> bool {
        !(hop_by_hop(name)
            || is(name, &http::header::CONTENT_LENGTH)
            || is(name, &X_FORWARDED_FOR)
            || (self.expect_continue && is(name, &http::header::EXPECT))
            || self
                .connection_named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes())))
    }
}

/// An upstream response head, parsed.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head in the upstream buffer.
    pub len: usize,
    /// Status code.
    pub status: u16,
    /// How its body is delimited.
    pub framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf` (`Ok(None)`: incomplete).
/// For a final response, writes the head for the client into `out`: status
/// line, end-to-end headers, and the framing the client will get; the
/// caller adds the connection header and the empty line with
/// [`finish_response_head`]. `request_head`: the request was HEAD.
pub fn parse_response(
    buf: &[u8],
    request_head: bool,
    decode_chunked: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut storage =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
        Err(_) => return Err("malformed response head"),
    };
    let status = response.code.expect("a complete head has a status");
    let http10 = response.version == Some(0);
    let headers: &[httparse::Header<'_>] = response.headers;
    let mut content_length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let (mut close, mut keep_alive) = (false, false);
    let mut named: Vec<&[u8]> = Vec::new();
    for header in headers {
        if is(header.name, &http::header::CONTENT_LENGTH) {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("invalid Content-Length in the response")?;
            if content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length in the response");
            }
            content_length = Some(n);
        } else if is(header.name, &http::header::TRANSFER_ENCODING) {
            transfer_encoding = Some(header.value);
        } else if is(header.name, &http::header::CONNECTION) {
            for token in tokens(header.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else {
                    named.push(token);
                }
            }
        }
    }
    let chunked = transfer_encoding.is_some_and(|te| {
        tokens(te)
            .next_back()
            .is_some_and(|last| last.eq_ignore_ascii_case(b"chunked"))
    });
    let framing = if request_head || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_encoding.is_some() {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let head = ResponseHead {
        len,
        status,
        framing,
        keep_alive: framing != Framing::UntilClose && if http10 { keep_alive } else { !close },
    };
    if status < 200 {
        return Ok(Some(head));
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in headers {
        let name = header.name;
        if hop_by_hop(name)
            || (transfer_encoding.is_some() && is(name, &http::header::CONTENT_LENGTH))
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        push_header(out, name.as_bytes(), header.value);
    }
    if chunked && !decode_chunked && framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    Ok(Some(head))
}

/// Ends a response head written by [`parse_response`].
pub fn finish_response_head(out: &mut Vec<u8>, close: bool, http10_keep_alive: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10_keep_alive {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed request: its head, the host and path routing saw, and the
    /// head sent upstream.
    #[derive(Debug)]
    struct Parsed {
        head: RequestHead,
        host: Option<String>,
        path: String,
        upstream: String,
    }

    fn parse(wire: &str) -> Result<Option<Parsed>, Rejection> {
        let mut out = Vec::new();
        let parsed = parse_request(wire.as_bytes(), 100, "10.0.0.9", &mut out, |r| {
            (r.host.map(String::from), r.path.to_string())
        })?;
        Ok(parsed.map(|(head, (host, path))| {
            finish_request_head(&mut out, head.framing);
            Parsed {
                head,
                host,
                path,
                upstream: String::from_utf8(out).unwrap(),
            }
        }))
    }

    #[test]
    fn a_request_head_is_rewritten_for_the_upstream() {
        let parsed = parse(
            "POST /api/x?q=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\n\
             Keep-Alive: timeout=5\r\nX-Forwarded-For: 203.0.113.9\r\nContent-Length: 3\r\nX-Request-Id: abc\r\n\r\nabc",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.host.as_deref(), Some("shop"));
        assert_eq!(parsed.path, "/api/x");
        let head = parsed.head;
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keep_alive && !head.idempotent && !head.upgrade);
        assert_eq!(
            parsed.upstream,
            "POST /api/x?q=1 HTTP/1.1\r\nHost: shop\r\nX-Request-Id: abc\r\n\
             x-forwarded-for: 203.0.113.9, 10.0.0.9\r\nx-forwarded-proto: http\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn absolute_targets_upgrades_and_http10_are_understood() {
        let absolute = parse("GET http://shop:8080/a HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(absolute.host.as_deref(), Some("shop:8080"));
        assert_eq!(absolute.path, "/a");
        assert!(
            absolute
                .upstream
                .starts_with("GET /a HTTP/1.1\r\nhost: shop:8080\r\n"),
            "{}",
            absolute.upstream
        );
        assert!(absolute.head.keep_alive && absolute.head.idempotent);

        let upgrade =
            parse("GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(upgrade.head.upgrade);
        assert!(
            upgrade
                .upstream
                .contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{}",
            upgrade.upstream
        );

        let old = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(old.head.http10 && !old.head.keep_alive);
        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(),
            "incomplete"
        );
    }

    #[test]
    fn ambiguous_or_unsupported_requests_are_rejected() {
        let status = |wire: &str| parse(wire).unwrap_err().status;
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(status("GET * HTTP/1.1\r\n\r\n"), StatusCode::BAD_REQUEST);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
        let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn a_response_head_keeps_end_to_end_headers_and_its_framing() {
        let mut out = Vec::new();
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n\
                     Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let head = parse_response(wire, false, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (200, Framing::Chunked, true)
        );
        finish_response_head(&mut out, false, false);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.framing, head.keep_alive),
            (Framing::UntilClose, false)
        );
        let head = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Empty, true));
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            true,
            false,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            head.framing,
            Framing::Empty,
            "a response to HEAD has no body"
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("Content-Length: 5")
        );
    }
}
