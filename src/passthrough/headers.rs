//! Which headers cross the gateway on a passed-through exchange.
//!
//! Invariant: towards the upstream only [`FORWARDED`] request headers pass (never the client's
//! `Authorization`, cookies, hop-by-hop or proxy headers); towards the client every upstream
//! header passes except hop-by-hop ones, those `Connection` names, and `Set-Cookie`.

use http::header::{HeaderMap, HeaderName, CONNECTION, SET_COOKIE};

/// Request headers passed to the upstream, beside the gateway's own (key, request id,
/// `User-Agent`, `Accept-Encoding`).
pub const FORWARDED: [&str; 5] = [
    "content-type",
    "accept",
    "x-trace-id",
    "traceparent",
    "tracestate",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy ones that travel like them.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The client's headers the upstream may see.
pub fn request(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED {
        for v in client.get_all(name) {
            out.append(HeaderName::from_static(name), v.clone());
        }
    }
    out
}

/// The upstream's headers the client may see.
pub fn response(upstream: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = upstream
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, v) in upstream {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || name == SET_COOKIE || named.iter().any(|x| x == n) {
            continue;
        }
        out.append(name.clone(), v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn only_listed_request_headers_pass() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer client-token"),
            ("cookie", "s=1"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("x-trace-id", "t1"),
            ("traceparent", "00-abc-def-01"),
            ("tracestate", "k=v"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let out = request(&h);
        let mut names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "content-type",
                "traceparent",
                "tracestate",
                "x-trace-id"
            ]
        );
    }

    #[test]
    fn hop_by_hop_and_cookies_stay_upstream() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("content-type", "text/event-stream"),
            ("set-cookie", "sid=1"),
            ("connection", "keep-alive, x-internal"),
            ("x-internal", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-version", "1.9.0"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let out = response(&h);
        let mut names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-version"]);
    }
}
