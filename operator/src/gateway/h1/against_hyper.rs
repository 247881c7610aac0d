//! The gateway's head parsers against hyper's, on generated heads: whenever
//! hyper (as a server for requests, as a client for responses) refuses a
//! head, the gateway refuses it too; whenever both take it, they agree on
//! method, target, headers and body framing (requests) or status and body
//! framing (responses). The gateway may refuse more (it is the stricter of
//! the two on purpose: a proxy must not read a message differently from
//! the servers behind it).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::Framing;
use super::head::{self, Asked};
use crate::gateway::forwarding::Peer;

/// What a parser made of a request head.
#[derive(Debug, Clone, PartialEq)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    /// The authority of an absolute-form target.
    authority: Option<String>,
    /// Every header, lowercase name and value, in order for each name
    /// (hyper's map groups them by name).
    headers: Vec<(String, Vec<u8>)>,
    /// `Some(n)`: a body of exactly n bytes; `None`: chunked.
    length: Option<u64>,
}

/// Headers grouped by name, without `Content-Length` (hyper keeps one of
/// several equal ones; the framing both read is compared on its own, and
/// the gateway writes its own length upstream anyway).
fn grouped(mut headers: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    headers.retain(|(name, _)| name != "content-length");
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    headers
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// hyper's HTTP/1 server on `wire`: the request its service was called
/// with, or `None` if it refused the head.
fn hyper_request(wire: &[u8]) -> Option<Request> {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 17);
        let seen: Arc<Mutex<Option<Request>>> = Arc::default();
        let record = seen.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let size = request.body().size_hint();
                *record.lock().unwrap() = Some(Request {
                    method: request.method().to_string(),
                    target: request
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    authority: request.uri().authority().map(|a| a.as_str().to_string()),
                    headers: grouped(
                        request
                            .headers()
                            .iter()
                            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                            .collect(),
                    ),
                    length: size.exact(),
                });
                async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
                }
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        client.write_all(wire).await.unwrap();
        let _ = client.shutdown().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connection).await;
        seen.lock().unwrap().take()
    })
}

/// The gateway's parser on `wire`: the request, or `None` if it refused it.
fn our_request(wire: &[u8]) -> Option<Request> {
    let peer = Peer {
        ip: "10.0.0.1",
        trusted: false,
        scheme: "http",
    };
    let mut out = Vec::new();
    let parsed = head::parse_request(wire, 100, &peer, &mut out, |input| {
        (
            input.method.to_string(),
            input.host.map(str::to_string),
            input
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect::<Vec<_>>(),
        )
    });
    let (request, (method, host, headers)) = parsed.ok()??;
    let line = String::from_utf8_lossy(&out);
    let target = line.split(' ').nth(1).unwrap().to_string();
    let absolute = !String::from_utf8_lossy(wire)
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .starts_with('/');
    Some(Request {
        method,
        target,
        authority: if absolute { host } else { None },
        headers: grouped(headers),
        length: match request.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::UntilClose => None,
        },
    })
}

/// Mostly one of `good`, sometimes one of `bad`.
fn mostly<T: Clone + std::fmt::Debug + 'static>(good: Vec<T>, bad: Vec<T>) -> BoxedStrategy<T> {
    prop_oneof![12 => prop::sample::select(good), 1 => prop::sample::select(bad)].boxed()
}

fn header_line() -> impl Strategy<Value = Vec<u8>> {
    let names = mostly(
        vec![
            "Host",
            "host",
            "Content-Length",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Upgrade",
            "Expect",
            "X-A",
            "Cookie",
        ],
        vec!["Bad Name", "X(A)", "", "X\u{e9}"],
    );
    let values = mostly(
        vec![
            &b"shop"[..],
            b"a:80",
            b"",
            b"5",
            b"0",
            b"chunked",
            b"close",
            b"keep-alive",
            b"upgrade",
            b"websocket",
            b"100-continue",
            b"[::1]",
            b"a\tb",
        ],
        vec![
            &b"+2"[..],
            b" 7 ",
            b"5, 5",
            b"18446744073709551616",
            b"gzip",
            b"chunked, gzip",
            b"gzip, chunked",
            b" chunked",
            b"\xff",
            b"a b",
            b"\x00",
        ],
    );
    (names, values, 0u8..20).prop_map(|(name, value, shape)| {
        let mut line = Vec::new();
        match shape {
            // An obsolete line folding continuation.
            0 => line.extend_from_slice(b" folded"),
            1 => {
                line.extend_from_slice(name.as_bytes());
                line.extend_from_slice(b" : ");
                line.extend_from_slice(value);
            }
            2 => {
                line.extend_from_slice(name.as_bytes());
                line.extend_from_slice(b":");
                line.extend_from_slice(value);
                line.extend_from_slice(b"  ");
            }
            _ => {
                line.extend_from_slice(name.as_bytes());
                line.extend_from_slice(b": ");
                line.extend_from_slice(value);
            }
        }
        line
    })
}

fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let methods = mostly(
        vec!["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE", "PATCH"],
        vec!["get", "G@T", "", "GET\t"],
    );
    let targets = mostly(
        vec![
            "/",
            "/a/b?c=d",
            "/{\"j\":1}",
            "/%zz",
            "/a|b",
            "/\u{e9}",
            "http://shop/x",
            "http://shop:8080",
            "http://[::1]:80/x",
            "HTTP://Shop/x?y",
            "//x",
            "/a?b?c",
            "/a\\b",
            "/^",
            "/a;b=c",
        ],
        vec![
            "/a<b",
            "/a`b",
            "*",
            "shop:443",
            "/a#f",
            "/?q=\"x\"",
            "http://a@b/",
            "http:/x",
            "/a\x7f",
        ],
    );
    let versions = mostly(
        vec!["HTTP/1.1", "HTTP/1.0"],
        vec!["HTTP/1.2", "HTTP/2.0", "http/1.1"],
    );
    (
        methods,
        targets,
        versions,
        prop::collection::vec(header_line(), 0..6),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(method, target, version, headers, bare_lf, with_host)| {
            let eol: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
            let mut wire = format!("{method} {target} {version}").into_bytes();
            wire.extend_from_slice(eol);
            if with_host {
                wire.extend_from_slice(b"Host: shop");
                wire.extend_from_slice(eol);
            }
            for header in headers {
                wire.extend_from_slice(&header);
                wire.extend_from_slice(eol);
            }
            wire.extend_from_slice(eol);
            wire
        })
}

/// What a parser made of a response head: status and body length
/// (`None`: chunked or until close).
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    length: Option<u64>,
}

/// hyper's HTTP/1 client reading `wire` as the answer to a GET (or HEAD).
fn hyper_response(wire: &[u8], head_request: bool) -> Option<Answer> {
    runtime().block_on(async {
        let (client_io, mut server) = tokio::io::duplex(1 << 17);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client_io))
                .await
                .ok()?;
        tokio::spawn(connection);
        let wire = wire.to_vec();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut chunk).await {
                    Ok(n) if n > 0 => request.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let _ = server.write_all(&wire).await;
            let _ = server.shutdown().await;
            // Keep the server side open until the client is done.
            let _ = server.read(&mut chunk).await;
        });
        let request = hyper::Request::builder()
            .method(if head_request { "HEAD" } else { "GET" })
            .uri("/")
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sender.send_request(request),
        )
        .await
        .ok()?
        .ok()?;
        Some(Answer {
            status: response.status().as_u16(),
            length: response.body().size_hint().exact(),
        })
    })
}

fn our_response(wire: &[u8], head_request: bool) -> Option<Answer> {
    let asked = Asked {
        head: head_request,
        websocket: false,
    };
    let (head, ()) = head::parse_response(wire, asked, None, |_| ()).ok()??;
    Some(Answer {
        status: head.status,
        length: match head.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::UntilClose => None,
        },
    })
}

fn response_head() -> impl Strategy<Value = Vec<u8>> {
    let statuses = mostly(
        vec![
            "200 OK",
            "204 No Content",
            "304 Not Modified",
            "404 Not Found",
            "200",
            "500 Internal Server Error",
            "201 \u{e9}",
            "302 Found",
        ],
        vec![
            "099 Low",
            "000 Zero",
            "600 High",
            "999 Max",
            "20 Short",
            "2000 Long",
            "2x0 X",
        ],
    );
    let versions = mostly(
        vec!["HTTP/1.1", "HTTP/1.0"],
        vec!["HTTP/2.0", "HTTP/1.2", "HTTP/1"],
    );
    (
        versions,
        statuses,
        prop::collection::vec(header_line(), 0..6),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(version, status, headers, bare_lf)| {
            let eol: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
            let mut wire = format!("{version} {status}").into_bytes();
            wire.extend_from_slice(eol);
            for header in headers {
                wire.extend_from_slice(&header);
                wire.extend_from_slice(eol);
            }
            wire.extend_from_slice(eol);
            wire
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn request_heads_hyper_refuses_are_refused_and_the_others_read_alike(wire in request_head()) {
        let theirs = hyper_request(&wire);
        let ours = our_request(&wire);
        let shown = String::from_utf8_lossy(&wire).into_owned();
        match (&theirs, &ours) {
            (None, Some(ours)) => prop_assert!(false, "hyper refused, the gateway took {ours:?}: {shown:?}"),
            (Some(theirs), Some(ours)) => prop_assert_eq!(theirs, ours, "{:?}", shown),
            _ => {}
        }
    }

    #[test]
    fn response_heads_hyper_refuses_are_refused_and_the_others_read_alike(
        wire in response_head(),
        head_request in any::<bool>(),
    ) {
        let theirs = hyper_response(&wire, head_request);
        let ours = our_response(&wire, head_request);
        let shown = String::from_utf8_lossy(&wire).into_owned();
        match (&theirs, &ours) {
            (None, Some(ours)) => prop_assert!(false, "hyper refused, the gateway took {ours:?}: {shown:?}"),
            (Some(theirs), Some(ours)) => prop_assert_eq!(theirs, ours, "{:?}", shown),
            _ => {}
        }
    }
}

#[test]
fn the_comparison_sees_both_outcomes() {
    // Guards against a harness that always says "refused" (which would make
    // the properties above pass vacuously).
    let good = b"POST /a?b HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\n";
    let theirs = hyper_request(good).expect("hyper takes a plain request");
    assert_eq!(Some(theirs), our_request(good));
    assert_eq!(
        hyper_request(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
        None
    );
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(
        hyper_response(chunked, false),
        Some(Answer {
            status: 200,
            length: None
        })
    );
    assert_eq!(
        our_response(chunked, false),
        Some(Answer {
            status: 200,
            length: None
        })
    );
    assert_eq!(
        hyper_response(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n", false),
        None
    );
}
