//! Host names as Gateway API matches them: a listener's and a route's
//! names intersect, and a request's host matches a name exactly or, for a
//! wildcard `*.example.com`, by a suffix of one or more whole labels (never
//! `example.com` itself).

/// Whether `host` (lowercase, no port) matches `pattern`.
pub fn matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The names a route with `route` host names serves on a listener with
/// `listener` host name: `None` when they do not intersect, the empty list
/// for any host.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(listener) = listener.map(str::to_ascii_lowercase) else {
        return Some(route.iter().map(|h| h.to_ascii_lowercase()).collect());
    };
    if route.is_empty() {
        return Some(vec![listener]);
    }
    let mut names: Vec<String> = route
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .filter_map(|route| {
            if matches(&listener, &route) || listener == route {
                Some(route)
            } else if matches(&route, &listener) {
                Some(listener.clone())
            } else {
                None
            }
        })
        .collect();
    names.sort();
    names.dedup();
    (!names.is_empty()).then_some(names)
}

/// Sort key of a name: exact names first, then longer wildcards.
pub fn specificity(pattern: &str) -> (bool, usize) {
    (pattern.starts_with('*'), usize::MAX - pattern.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_or_more_labels_but_not_the_bare_suffix() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
        assert!(matches("Very.Specific.com", "very.specific.com"));
    }

    #[test]
    fn listener_and_route_names_intersect_as_the_spec_says() {
        let v = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect(None, &[]), Some(vec![]));
        assert_eq!(
            intersect(Some("*.wildcard.io"), &[]),
            Some(v(&["*.wildcard.io"]))
        );
        assert_eq!(
            intersect(Some("*.wildcard.io"), &v(&["foo.wildcard.io", "other.io"])),
            Some(v(&["foo.wildcard.io"]))
        );
        assert_eq!(
            intersect(Some("very.specific.com"), &v(&["*.specific.com"])),
            Some(v(&["very.specific.com"]))
        );
        assert_eq!(
            intersect(Some("*.anotherwildcard.io"), &v(&["*.anotherwildcard.io"])),
            Some(v(&["*.anotherwildcard.io"]))
        );
        assert_eq!(
            intersect(Some("*.io"), &v(&["*.wildcard.io"])),
            Some(v(&["*.wildcard.io"]))
        );
        assert_eq!(intersect(Some("a.com"), &v(&["b.com", "*.a.com"])), None);
    }
}
