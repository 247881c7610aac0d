//! Request and response heads of HTTP/1.x: parsed in place with `httparse`,
//! checked strictly, and rewritten for the other side straight into a byte
//! buffer.
//!
//! A request is refused (400, 431 or 501) when its framing could be read two
//! ways or its routing facts are unclear: both `Content-Length` and
//! `Transfer-Encoding`, differing or non-numeric lengths, a transfer coding
//! other than `chunked`, `Host` missing (HTTP/1.1), repeated or malformed,
//! a target that is not a path or an `http://` URL. A response is refused
//! (502) for a status outside 100-599, a non-numeric or conflicting
//! `Content-Length`, a transfer coding other than `chunked`, or a switch of
//! protocols that was not asked for.

use std::mem::MaybeUninit;

use http::StatusCode;

use super::body::Framing;
use crate::gateway::filters::HeaderEdits;
use crate::gateway::forwarding::{self, Peer, RequestLine, hop_by_hop, push_header};
use crate::gateway::table::CompiledRoute;

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

fn bad(message: &'static str) -> Rejection {
    reject(StatusCode::BAD_REQUEST, message)
}

/// What the proxy needs to know of a client's request, its head already
/// rewritten for the upstream.
#[derive(Debug, Clone)]
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
    /// A websocket handshake.
    pub upgrade: bool,
    /// Sent `Expect: 100-continue` and a body: waits for "100 Continue".
    pub expect_continue: bool,
}

/// The parts of a request a route looks at.
pub struct RouteInput<'a> {
    /// Host (the `Host` header, or the authority of an absolute-form target).
    pub host: Option<&'a str>,
    /// Path without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// Method.
    pub method: &'a str,
    /// All headers.
    pub headers: &'a [httparse::Header<'a>],
}

/// Parses the request head at the start of `buf`. On success writes the
/// head to send upstream into `out` (without framing headers and the final
/// empty line) and calls `route` with what routing needs. `Ok(None)`: the
/// head is not complete yet.
pub fn parse_request<R>(
    buf: &[u8],
    max_headers: usize,
    peer: &Peer<'_>,
    out: &mut Vec<u8>,
    route: impl FnOnce(&RouteInput<'_>) -> R,
) -> Result<Option<(RequestHead, R)>, Rejection> {
    parse_routed_request(buf, max_headers, peer, out, route, |_| (None, None))
}

/// [`parse_request`], where `route`'s answer may name the route chosen
/// (`compiled`), whose filters then shape the head sent upstream (header
/// edits, host and path rewrite), and the `traceparent` the upstream gets.
pub fn parse_routed_request<R>(
    buf: &[u8],
    max_headers: usize,
    peer: &Peer<'_>,
    out: &mut Vec<u8>,
    route: impl FnOnce(&RouteInput<'_>) -> R,
    compiled: impl FnOnce(&R) -> (Option<&CompiledRoute>, Option<&[u8]>),
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
        Err(_) => return Err(bad("malformed request head")),
    };
    let method = request.method.expect("a complete head has a method");
    let target = request.path.expect("a complete head has a target");
    let http10 = request.version == Some(0);
    let headers: &[httparse::Header<'_>] = request.headers;

    let mut info = HeaderInfo::default();
    for header in headers {
        info.note(header)?;
    }
    if info.transfer_encoding && info.content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if info.transfer_encoding && http10 {
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if info.transfer_encoding && !info.chunked {
        return Err(reject(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported Transfer-Encoding",
        ));
    }
    if info.hosts > 1 {
        return Err(bad("more than one Host header"));
    }
    if info.hosts == 0 && !http10 {
        return Err(bad("an HTTP/1.1 request needs a Host header"));
    }
    let (authority, path) = split_target(target)?;
    if let Some(host) = info.host
        && !valid_authority(host)
    {
        return Err(bad("invalid Host header"));
    }
    // An absolute-form target names the host; the Host header is ignored
    // (RFC 9112, section 3.2.2) and replaced upstream.
    let host = authority.or(info.host);
    let framing = match (info.chunked, info.content_length) {
        (true, _) => Framing::Chunked,
        (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    let upgrade = info.websocket && info.connection_upgrade && !http10 && method == "GET";
    let head = RequestHead {
        len,
        framing,
        keep_alive: if http10 {
            info.connection_keep_alive && !info.connection_close
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
    let (bare, query) = match path.split_once('?') {
        Some((bare, query)) => (bare, Some(query)),
        None => (path, None),
    };
    let routed = route(&RouteInput {
        host,
        path: bare,
        query,
        method,
        headers,
    });
    let (chosen, traceparent) = compiled(&routed);
    let filtered = chosen.and_then(|r| Some((r, r.filters.as_deref()?)));
    let rewrite = filtered.and_then(|(r, f)| Some((r, f.rewrite.as_ref()?)));
    let target = rewrite.and_then(|(r, rewrite)| rewrite.target(&r.path, path));
    let host = rewrite
        .and_then(|(_, rewrite)| rewrite.hostname.as_deref())
        .or(host);
    forwarding::write_request_head(
        out,
        &RequestLine {
            method,
            target: target.as_deref().unwrap_or(path),
            host: host.map(str::as_bytes),
            connection_named: &info.connection_named,
            websocket: upgrade,
            edits: filtered.map(|(_, f)| &f.request),
            traceparent,
        },
        headers,
        peer,
    );
    Ok(Some((head, routed)))
}

/// The value of header `name` (lowercase) in a head written by
/// [`parse_request`].
pub fn header_value<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (field, value) = line.split_at(line.iter().position(|b| *b == b':')?);
        field
            .eq_ignore_ascii_case(name)
            .then(|| value[1..].trim_ascii())
    })
}

/// Ends a request head written by [`parse_request`] with the framing of the
/// body that will follow.
pub fn finish_request_head(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(n, out);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Byte classes of request targets and hosts, looked up per byte.
const PATH: u8 = 1;
const QUERY: u8 = 2;
const HOST: u8 = 4;

/// Characters of a path (RFC 3986 `pchar` and `/`, plus `"`, `{`, `}`, `|`,
/// `[`, `]`, `\` and `^`, which clients send unescaped and common parsers
/// accept) and of a query (the same and `?`, without `"`); characters of a
/// registered host name (unreserved, sub-delims and `%`). Non-ASCII bytes
/// may be in a target (it is already known to be UTF-8), never in a host.
const CLASSES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
        {
            class = PATH | QUERY | HOST;
        } else if matches!(
            c,
            b':' | b'@' | b'/' | b'{' | b'}' | b'|' | b'[' | b']' | b'\\' | b'^'
        ) {
            class = PATH | QUERY;
        } else if c == b'"' {
            class = PATH;
        } else if c == b'?' {
            class = QUERY;
        } else if c >= 0x80 {
            class = PATH | QUERY;
        }
        table[b] = class;
        b += 1;
    }
    table
};

/// Whether a path-and-query has only characters a target may have.
pub fn valid_path_and_query(target: &str) -> bool {
    let bytes = target.as_bytes();
    let query = bytes.iter().position(|&b| b == b'?').unwrap_or(bytes.len());
    bytes[..query]
        .iter()
        .all(|&b| CLASSES[b as usize] & PATH != 0)
        && bytes[query..]
            .iter()
            .all(|&b| CLASSES[b as usize] & QUERY != 0)
}

/// Whether `host` is `host[:port]`: a registered name (letters, digits and
/// `-._~!$&'()*+,;=%`), an IPv4 address, or an IPv6 literal in brackets;
/// the port digits only. The empty value is allowed (RFC 9112, section 3.2).
pub fn valid_authority(host: &str) -> bool {
    let bytes = host.as_bytes();
    let (name, port): (&[u8], &[u8]) = if bytes.first() == Some(&b'[') {
        let Some(close) = bytes.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..close];
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match &bytes[close + 1..] {
            [] => (&[], &[]),
            [b':', port @ ..] if !port.is_empty() => (&[], port),
            _ => return false,
        }
    } else {
        match bytes.iter().rposition(|&b| b == b':') {
            Some(colon) if colon + 1 < bytes.len() => (&bytes[..colon], &bytes[colon + 1..]),
            Some(_) => return false,
            None => (bytes, &[]),
        }
    };
    name.iter().all(|&b| CLASSES[b as usize] & HOST != 0)
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
}

/// `/path?q` as it is, or `http://authority/path?q` split into its parts.
fn split_target(target: &str) -> Result<(Option<&str>, &str), Rejection> {
    if target.starts_with('/') {
        if !valid_path_and_query(target) {
            return Err(bad("invalid character in the request target"));
        }
        return Ok((None, target));
    }
    let scheme = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"));
    if scheme.is_none() {
        return Err(bad("request target must be a path or an http:// URL"));
    }
    let rest = &target[7..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') || !valid_authority(authority) {
        return Err(bad("request target has no valid host"));
    }
    if path.starts_with('?') {
        return Err(bad("request target must be a path or an http:// URL"));
    }
    let path = if path.is_empty() { "/" } else { path };
    if !valid_path_and_query(path) {
        return Err(bad("invalid character in the request target"));
    }
    Ok((Some(authority), path))
}

fn is(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted)
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// Whether a length is digits only (no sign, no space, no comma list) and
/// fits: the only form both sides of a proxy read the same way.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// What the headers of a request say about framing and forwarding.
#[derive(Default)]
struct HeaderInfo<'a> {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    hosts: usize,
    host: Option<&'a str>,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_upgrade: bool,
    /// Other header names listed in `Connection` (hop-by-hop too).
    connection_named: Vec<&'a [u8]>,
    websocket: bool,
    expect_continue: bool,
}

impl<'a> HeaderInfo<'a> {
    fn note(&mut self, header: &httparse::Header<'a>) -> Result<(), Rejection> {
        let (name, value) = (header.name, header.value);
        if is(name, "content-length") {
            let n = parse_length(value).ok_or_else(|| bad("invalid Content-Length"))?;
            if self.content_length.is_some_and(|m| m != n) {
                return Err(bad("conflicting Content-Length"));
            }
            self.content_length = Some(n);
        } else if is(name, "transfer-encoding") {
            // Only `chunked`, once, as the only coding is supported.
            self.chunked =
                !self.transfer_encoding && value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            self.transfer_encoding = true;
        } else if is(name, "host") {
            self.hosts += 1;
            // Not UTF-8 is not a host: refused below like any invalid one.
            self.host = Some(std::str::from_utf8(value).unwrap_or("\u{0}"));
        } else if is(name, "connection") {
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
        } else if is(name, "upgrade") {
            let mut protocols = tokens(value).filter(|t| !t.is_empty());
            self.websocket = protocols
                .next()
                .is_some_and(|p| p.eq_ignore_ascii_case(b"websocket"))
                && protocols.next().is_none();
        } else if is(name, "expect") {
            self.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }
}

/// An upstream response head, parsed and checked.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Bytes of the head in the upstream buffer.
    pub len: usize,
    /// Status code (100 to 599).
    pub status: u16,
    /// How its body is delimited.
    pub framing: Framing,
    /// `Content-Length` as sent (also on responses without a body, such as
    /// to HEAD), checked.
    pub content_length: Option<u64>,
    /// The connection can carry another request afterwards: a clean
    /// HTTP/1.1 (or keep-alive HTTP/1.0) exchange with nothing odd in it.
    pub reusable: bool,
    /// A `101` that switches to websocket.
    pub websocket: bool,
}

/// A parsed response head and its headers, for the side that sends it on.
pub struct Response<'a> {
    /// What the gateway makes of it.
    pub head: &'a ResponseHead,
    /// Reason phrase.
    pub reason: &'a str,
    headers: &'a [httparse::Header<'a>],
    connection_named: &'a [&'a [u8]],
    /// The route's edits of the response's headers.
    edits: Option<&'a HeaderEdits>,
}

impl Response<'_> {
    /// Calls `f` with every end-to-end header: without hop-by-hop headers,
    /// those the upstream's `Connection` lists, and the framing headers
    /// (which the gateway writes for the body it sends).
    pub fn each_header(&self, mut f: impl FnMut(&str, &[u8])) {
        for header in self.headers {
            let name = header.name;
            if hop_by_hop(name)
                || (name.len() == 14 && is(name, "content-length"))
                || self
                    .connection_named
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
                || self.edits.is_some_and(|e| e.drops(name))
            {
                continue;
            }
            f(name, header.value);
        }
        if let Some(edits) = self.edits {
            edits.each_written(f);
        }
    }

    /// Writes the status line and end-to-end headers, HTTP/1.1, into `out`
    /// (no framing headers and no final empty line).
    pub fn write_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(u64::from(self.head.status), out);
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.each_header(|name, value| push_header(out, name.as_bytes(), value));
    }
}

/// What the request asked for that shapes the response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    /// A HEAD request (no body follows whatever the headers say).
    pub head: bool,
    /// A websocket handshake (a 101 may follow).
    pub websocket: bool,
}

/// Parses and checks the response head at the start of `buf`; `Ok(None)`:
/// incomplete. `sink` gets the parsed response while its headers are
/// borrowed from `buf`.
pub fn parse_response<T>(
    buf: &[u8],
    asked: Asked,
    edits: Option<&HeaderEdits>,
    sink: impl FnOnce(&Response<'_>) -> T,
) -> Result<Option<(ResponseHead, T)>, &'static str> {
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
    if !(100..=599).contains(&status) {
        return Err("response status outside 100-599");
    }
    let http10 = response.version == Some(0);
    let headers: &[httparse::Header<'_>] = response.headers;
    let mut content_length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let (mut close, mut keep_alive, mut connection_upgrade) = (false, false, false);
    let mut odd = false;
    let mut websocket = false;
    let mut named: Vec<&[u8]> = Vec::new();
    for header in headers {
        if is(header.name, "content-length") {
            let n = parse_length(header.value).ok_or("invalid Content-Length in the response")?;
            if content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length in the response");
            }
            odd |= content_length.is_some();
            content_length = Some(n);
        } else if is(header.name, "transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err("more than one Transfer-Encoding in the response");
            }
            transfer_encoding = Some(header.value);
        } else if is(header.name, "connection") {
            for token in tokens(header.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                } else if !token.is_empty() {
                    // Naming a framing header cannot unframe the response;
                    // such a connection is not trusted with another request.
                    odd |= token.eq_ignore_ascii_case(b"content-length")
                        || token.eq_ignore_ascii_case(b"transfer-encoding");
                    named.push(token);
                }
            }
        } else if is(header.name, "upgrade") {
            websocket = header.value.trim_ascii().eq_ignore_ascii_case(b"websocket");
        }
    }
    if let Some(te) = transfer_encoding
        && !te.trim_ascii().eq_ignore_ascii_case(b"chunked")
    {
        return Err("unsupported Transfer-Encoding in the response");
    }
    // HTTP/1.0 has no transfer codings: such a message was framed by
    // someone who did not understand it (RFC 9112, section 6.1).
    if transfer_encoding.is_some() && http10 {
        return Err("Transfer-Encoding in an HTTP/1.0 response");
    }
    if status == 101 && !(asked.websocket && websocket && connection_upgrade) {
        return Err("switched protocols unasked");
    }
    // A length beside chunked framing is ignored, and the connection closed
    // afterwards (RFC 9112, section 6.3).
    odd |= transfer_encoding.is_some() && content_length.is_some();
    let bodiless = asked.head || status < 200 || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if transfer_encoding.is_some() {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let head = ResponseHead {
        len,
        status,
        framing,
        content_length: if transfer_encoding.is_some() || status == 204 {
            None
        } else {
            content_length
        },
        reusable: framing != Framing::UntilClose
            && !odd
            && status != 101
            && if http10 { keep_alive && !close } else { !close },
        websocket: status == 101,
    };
    let sunk = sink(&Response {
        head: &head,
        reason: response.reason.unwrap_or(""),
        headers,
        connection_named: &named,
        edits: edits.filter(|e| !e.is_empty()),
    });
    Ok(Some((head, sunk)))
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

    const PEER: Peer<'static> = Peer {
        ip: "10.0.0.9",
        trusted: false,
        scheme: "http",
    };

    fn parse(wire: &str) -> Result<Option<Parsed>, Rejection> {
        let mut out = Vec::new();
        let parsed = parse_request(wire.as_bytes(), 100, &PEER, &mut out, |r| {
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
            "POST /api/x?q=1 HTTP/1.1\r\nhost: shop\r\nx-request-id: abc\r\n\
             x-forwarded-for: 203.0.113.9, 10.0.0.9\r\nx-forwarded-proto: http\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn absolute_targets_upgrades_and_http10_are_understood() {
        let absolute = parse("GET http://shop:8080/a HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            absolute.host.as_deref(),
            Some("shop:8080"),
            "the target's authority wins"
        );
        assert_eq!(absolute.path, "/a");
        assert!(
            absolute
                .upstream
                .starts_with("GET /a HTTP/1.1\r\nhost: shop:8080\r\n"),
            "{}",
            absolute.upstream
        );
        assert_eq!(absolute.upstream.matches("host:").count(), 1);

        let upgrade = parse(
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
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
        let h2c = parse(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!h2c.head.upgrade, "h2c is never an upgrade");
        assert!(
            !h2c.upstream.to_ascii_lowercase().contains("upgrade"),
            "{}",
            h2c.upstream
        );
        assert!(!h2c.upstream.to_ascii_lowercase().contains("http2-settings"));

        let old = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(old.head.http10 && !old.head.keep_alive);
        assert_eq!(old.host, None, "HTTP/1.0 may leave Host out");
        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(),
            "incomplete"
        );
    }

    #[test]
    fn ambiguous_or_unsupported_requests_are_rejected() {
        let status = |wire: &str| parse(wire).unwrap_err().status;
        for wire in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \u{e9}\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:x\r\n\r\n",
            "GET /a<b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /?q=\"x\" HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://user@shop/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET https://shop/ HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(status(wire), StatusCode::BAD_REQUEST, "{wire:?}");
        }
        let mut wire = b"GET / HTTP/1.1\r\nHost: ".to_vec();
        wire.extend_from_slice(&[0xff, 0xfe]);
        wire.extend_from_slice(b"\r\nHost: b\r\n\r\n");
        let mut out = Vec::new();
        assert_eq!(
            parse_request(&wire, 100, &PEER, &mut out, |_| ())
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST,
            "a second Host after one that is not UTF-8"
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            StatusCode::NOT_IMPLEMENTED
        );
        let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn hosts_are_names_addresses_or_bracketed_literals_with_a_port() {
        for ok in [
            "shop",
            "shop.example.com:8080",
            "10.0.0.1",
            "[::1]:80",
            "[fd00::5]",
            "",
            "a-b_c~d",
        ] {
            assert!(valid_authority(ok), "{ok}");
        }
        for bad in [
            "a b", "a/b", "[::1", "[zz]", "a:80:80", "a:123456", "a\u{0}", "a@b", "[::1]x",
        ] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }

    fn response(wire: &[u8], asked: Asked) -> Result<(ResponseHead, String), &'static str> {
        parse_response(wire, asked, None, |r| {
            let mut out = Vec::new();
            r.write_head(&mut out);
            String::from_utf8(out).unwrap()
        })
        .map(|parsed| parsed.expect("complete"))
    }

    #[test]
    fn a_response_head_keeps_end_to_end_headers_and_its_framing() {
        let (head, out) = response(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\
              Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            Asked::default(),
        )
        .unwrap();
        assert_eq!((head.status, head.framing), (200, Framing::Chunked));
        assert!(
            !head.reusable,
            "a length beside chunked framing: not reused"
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n");
        let (head, _) = response(b"HTTP/1.0 200 OK\r\n\r\n", Asked::default()).unwrap();
        assert_eq!((head.framing, head.reusable), (Framing::UntilClose, false));
        let (head, _) = response(b"HTTP/1.1 204 No Content\r\n\r\n", Asked::default()).unwrap();
        assert_eq!((head.framing, head.reusable), (Framing::Empty, true));
        let (head, _) = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Asked {
                head: true,
                websocket: false,
            },
        )
        .unwrap();
        assert_eq!(
            head.framing,
            Framing::Empty,
            "a response to HEAD has no body"
        );
        assert_eq!(head.content_length, Some(5), "but its length is passed on");
        let (head, out) = response(
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok",
            Asked::default(),
        )
        .unwrap();
        assert_eq!(
            head.framing,
            Framing::Length(2),
            "Connection cannot unframe a response"
        );
        assert!(!head.reusable);
        assert_eq!(out, "HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn responses_with_bad_status_framing_or_upgrades_are_refused() {
        for wire in [
            &b"HTTP/1.1 099 Low\r\n\r\n"[..],
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            assert!(
                response(wire, Asked::default()).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let ws = Asked {
            head: false,
            websocket: true,
        };
        assert!(
            response(
                b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
                ws
            )
            .is_err()
        );
        let (head, _) = response(
            b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            ws,
        )
        .unwrap();
        assert!(head.websocket);
    }
}
