//! What a route does to a request besides choosing its backend: header
//! edits both ways, a redirect answered by the gateway, and a rewrite of
//! host and path before the request goes upstream (Gateway API's
//! RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect and
//! URLRewrite filters). Pure: compiled once with the table, applied per
//! request by the protocol adapters.

use super::table::PathMatch;

/// Headers a route sets, adds and removes (names lowercase).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Replaced: every field of the name is dropped, this one written.
    pub set: Vec<(String, String)>,
    /// Appended: written after the fields already there.
    pub add: Vec<(String, String)>,
    /// Dropped.
    pub remove: Vec<String>,
}

/// Header names a filter may not touch: the gateway writes them itself (the
/// framing, the connection's, `Host` and the forwarding headers), so an
/// edit of one could break the message's framing or forge its origin.
fn protected(name: &str) -> bool {
    super::forwarding::hop_by_hop(name)
        || matches!(
            name,
            "host"
                | "content-length"
                | "transfer-encoding"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-request-id"
                | "location"
        )
}

/// A value that can go into a header field as it is: no control
/// characters besides tab (CR and LF would end the field).
fn clean_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A header name: an RFC 9110 token.
fn clean_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl HeaderEdits {
    /// The edits of a modifier, names lowercased; protected names and
    /// values that cannot be written are left out.
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        add: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let keep = |(name, value): (&str, &str)| {
            let name = name.to_ascii_lowercase();
            (clean_name(&name) && !protected(&name) && clean_value(value))
                .then(|| (name, value.to_string()))
        };
        Self {
            set: set.into_iter().filter_map(keep).collect(),
            add: add.into_iter().filter_map(keep).collect(),
            remove: remove
                .into_iter()
                .map(str::to_ascii_lowercase)
                .filter(|n| clean_name(n) && !protected(n))
                .collect(),
        }
    }

    /// No edit at all.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether a field `name` that arrived is left out (removed, or
    /// replaced by a set).
    pub fn drops(&self, name: &str) -> bool {
        self.remove.iter().any(|n| n.eq_ignore_ascii_case(name))
            || self.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Calls `f` with the fields the edits write (sets, then adds).
    pub fn each_written(&self, mut f: impl FnMut(&str, &[u8])) {
        for (name, value) in self.set.iter().chain(&self.add) {
            f(name, value.as_bytes());
        }
    }
}

/// How a path changes (Gateway API's HTTPPathModifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    /// The whole path becomes this.
    Full(String),
    /// The part the route's prefix matched becomes this.
    Prefix(String),
}

impl PathChange {
    /// `path` (without query) changed, for a route that matched it with
    /// `matched`.
    pub fn apply(&self, matched: &PathMatch, path: &str) -> String {
        match self {
            PathChange::Full(full) => full.clone(),
            PathChange::Prefix(replacement) => {
                let rest = match matched {
                    PathMatch::Prefix(prefix) if prefix != "/" => {
                        &path[prefix.len().min(path.len())..]
                    }
                    PathMatch::Prefix(_) => path,
                    // Only a prefix match has a prefix to replace (the CRD
                    // says so); an exact match is replaced whole.
                    PathMatch::Exact(_) => "",
                };
                let rest = rest.trim_start_matches('/');
                let base = replacement.trim_end_matches('/');
                match (base.is_empty(), rest.is_empty()) {
                    (true, true) => "/".into(),
                    (true, false) => format!("/{rest}"),
                    (false, true) => base.into(),
                    (false, false) => format!("{base}/{rest}"),
                }
            }
        }
    }
}

/// A redirect the gateway answers itself (RequestRedirect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https` (none: the request's).
    pub scheme: Option<String>,
    /// Host name (none: the request's, without its port).
    pub hostname: Option<String>,
    /// Path change (none: the request's path).
    pub path: Option<PathChange>,
    /// Port (none: the scheme's well-known port when the scheme is set,
    /// else the listener's).
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status: u16,
}

/// The request a redirect answers.
pub struct Asked<'a> {
    /// Scheme it came in with.
    pub scheme: &'a str,
    /// Its host (as sent: it may carry a port).
    pub host: Option<&'a str>,
    /// Port of the listener it came in on.
    pub port: u16,
    /// Path without query.
    pub path: &'a str,
    /// Query, without `?`.
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` for `asked`, which the route matched with `matched`.
    /// The port is written only when it is not the scheme's well-known one.
    pub fn location(&self, matched: &PathMatch, asked: &Asked<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(asked.scheme);
        let host = match &self.hostname {
            Some(host) => host.as_str(),
            None => asked.host.map(strip_port).unwrap_or(""),
        };
        let port = match (self.port, &self.scheme) {
            (Some(port), _) => port,
            (None, Some(_)) => well_known(scheme),
            (None, None) => asked.port,
        };
        let path = match &self.path {
            Some(change) => change.apply(matched, asked.path),
            None => asked.path.to_string(),
        };
        let mut location = format!("{scheme}://{host}");
        if port != well_known(scheme) {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(query) = asked.query {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

fn well_known(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

/// A host without its port (`[::1]:80` keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// A change of the request before it goes upstream (URLRewrite).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The `Host` sent upstream.
    pub hostname: Option<String>,
    /// The path sent upstream (the query stays).
    pub path: Option<PathChange>,
}

impl Rewrite {
    /// The target (path and query) sent upstream for `target`, if it
    /// changes.
    pub fn target(&self, matched: &PathMatch, target: &str) -> Option<String> {
        let change = self.path.as_ref()?;
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let mut changed = change.apply(matched, path);
        if let Some(query) = query {
            changed.push('?');
            changed.push_str(query);
        }
        Some(changed)
    }
}

/// Everything a route does to its requests and responses besides routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Edits of the request's headers.
    pub request: HeaderEdits,
    /// Edits of the response's headers.
    pub response: HeaderEdits,
    /// Answered with a redirect instead of being proxied.
    pub redirect: Option<Redirect>,
    /// Host and path rewritten on the way upstream.
    pub rewrite: Option<Rewrite>,
}

impl Filters {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty()
            && self.response.is_empty()
            && self.redirect.is_none()
            && self.rewrite.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.into())
    }

    #[test]
    fn a_prefix_replacement_keeps_the_rest_of_the_path() {
        for (replacement, matched, path, expected) in [
            ("/one", "/prefix/one", "/prefix/one/two", "/one/two"),
            ("/", "/strip-prefix", "/strip-prefix/three", "/three"),
            ("/", "/strip-prefix", "/strip-prefix", "/"),
            ("/prefix", "/p", "/p/one", "/prefix/one"),
            ("/new/", "/old", "/old/", "/new"),
            ("/x", "/", "/a/b", "/x/a/b"),
        ] {
            let change = PathChange::Prefix(replacement.into());
            assert_eq!(change.apply(&prefix(matched), path), expected, "{path}");
        }
        assert_eq!(
            PathChange::Full("/one".into()).apply(&prefix("/full/one"), "/full/one/two"),
            "/one"
        );
    }

    #[test]
    fn a_rewrite_keeps_the_query() {
        let rewrite = Rewrite {
            hostname: None,
            path: Some(PathChange::Prefix("/v2".into())),
        };
        assert_eq!(
            rewrite.target(&prefix("/v1"), "/v1/items?id=3").as_deref(),
            Some("/v2/items?id=3")
        );
        assert_eq!(Rewrite::default().target(&prefix("/v1"), "/v1"), None);
    }

    #[test]
    fn redirect_locations_name_the_port_only_when_it_is_not_the_schemes() {
        let asked = Asked {
            scheme: "http",
            host: Some("shop.example:8080"),
            port: 8080,
            path: "/cart",
            query: Some("a=1"),
        };
        let redirect = |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: hostname.map(Into::into),
            path: None,
            port,
            status: 302,
        };
        let at = |r: Redirect| r.location(&prefix("/"), &asked);
        assert_eq!(
            at(redirect(None, None, None)),
            "http://shop.example:8080/cart?a=1"
        );
        assert_eq!(
            at(redirect(None, Some("example.org"), Some(80))),
            "http://example.org/cart?a=1"
        );
        assert_eq!(
            at(redirect(Some("https"), None, None)),
            "https://shop.example/cart?a=1"
        );
        assert_eq!(
            at(redirect(Some("https"), None, Some(8443))),
            "https://shop.example:8443/cart?a=1"
        );
        let v6 = Asked {
            host: Some("[::1]:80"),
            port: 80,
            query: None,
            ..asked
        };
        assert_eq!(
            redirect(None, None, None).location(&prefix("/"), &v6),
            "http://[::1]/cart"
        );
    }

    #[test]
    fn edits_leave_the_gateways_own_headers_and_unwritable_values_alone() {
        let edits = HeaderEdits::new(
            [
                ("X-Set", "v"),
                ("Content-Length", "0"),
                ("X-Bad", "a\r\nb: c"),
            ],
            [("Host", "evil"), ("X-Add", "w")],
            ["Transfer-Encoding", "X-Gone"],
        );
        assert_eq!(edits.set, [("x-set".to_string(), "v".to_string())]);
        assert_eq!(edits.add, [("x-add".to_string(), "w".to_string())]);
        assert_eq!(edits.remove, ["x-gone"]);
        assert!(edits.drops("X-SET") && edits.drops("x-gone") && !edits.drops("x-add"));
    }
}
