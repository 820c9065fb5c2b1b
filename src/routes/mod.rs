//! The routes: which of the gateway's answers a request asks for, read from its method and path.
//!
//! Invariant: a request is routed on its path with repeated `/` merged and nothing else changed
//! (percent-encoded bytes stay as sent); each route says which methods it serves, whether it
//! takes a request body and whether it is only for clients, and its `as_str()` is the `route`
//! word of logs and metrics. Adding a route is a variant here and a file beside this one for its
//! handler.

pub mod health;
pub mod run_detail;
pub mod run_events;
pub mod wait;

use std::borrow::Cow;

use http::Method;

/// Path prefix of the run-detail route, as Dify serves it under `/v1`.
pub const RUN_DETAIL_PREFIX: &str = "/v1/workflows/run/";

/// Path suffix of the status-stream route, after the run id.
pub const RUN_EVENTS_SUFFIX: &str = "/events";

/// Path of the public health check.
pub const HEALTH_PATH: &str = "/healthz";

/// The `route` word of a request no route matched.
pub const UNKNOWN: &str = "unknown";

/// A route of the public listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET`/`HEAD /v1/workflows/run/{id}`: a run's detail, from the cache or the upstream.
    RunDetail,
    /// `GET`/`HEAD /v1/workflows/run/{id}/events`: a run's status as an event stream.
    RunEvents,
    /// `GET`/`HEAD /healthz`: the process is up.
    Health,
}

/// Why no route serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misroute {
    /// No route has this path.
    NotFound,
    /// The route exists but not for this method.
    Method(Route),
}

impl Misroute {
    /// The route the path named, if any.
    pub fn route(self) -> Option<Route> {
        match self {
            Misroute::NotFound => None,
            Misroute::Method(r) => Some(r),
        }
    }
}

impl Route {
    /// The route `method` and `path` (repeated `/` merged, see [`merge_slashes`]) ask for, with
    /// the path's parameter as sent (the run id; empty for routes without one).
    #[inline]
    pub fn parse<'p>(method: &Method, path: &'p str) -> Result<(Route, &'p str), Misroute> {
        let (route, param) = match path.strip_prefix(RUN_DETAIL_PREFIX) {
            Some(id) if !id.contains('/') => (Route::RunDetail, id),
            Some(rest) => match rest.strip_suffix(RUN_EVENTS_SUFFIX) {
                Some(id) if !id.contains('/') => (Route::RunEvents, id),
                _ => return Err(Misroute::NotFound),
            },
            _ if path == HEALTH_PATH => (Route::Health, ""),
            _ => return Err(Misroute::NotFound),
        };
        if !route.allows(method) {
            return Err(Misroute::Method(route));
        }
        Ok((route, param))
    }

    /// Does the route serve `method`?
    #[inline]
    pub fn allows(self, method: &Method) -> bool {
        match self {
            Route::RunDetail | Route::RunEvents | Route::Health => {
                method == Method::GET || method == Method::HEAD
            }
        }
    }

    /// Does the route take a request body? A route that does not still reads a small one (some
    /// SDKs send `{}` with every GET) and drops it, see [`crate::intake::discard_body`].
    pub fn takes_body(self) -> bool {
        match self {
            Route::RunDetail | Route::RunEvents | Route::Health => false,
        }
    }

    /// Is the route only for clients (a token, when clients are configured, under the
    /// client's rate limit)? Routes that are not answer anyone.
    pub fn needs_token(self) -> bool {
        match self {
            Route::RunDetail | Route::RunEvents => true,
            Route::Health => false,
        }
    }

    /// The `route` word of logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::RunDetail => "run_detail",
            Route::RunEvents => "run_events",
            Route::Health => "healthz",
        }
    }

    /// The `route` word of a request that took `route`, or [`UNKNOWN`] for none.
    pub fn label(route: Option<Route>) -> &'static str {
        route.map_or(UNKNOWN, Route::as_str)
    }
}

/// `path` with every run of `/` merged into one, as Dify's nginx does (`merge_slashes`), so a
/// client that joins a base URL ending in `/` with `/workflows/...` is still routed. Only the
/// byte `/` is touched: `%2F` and every other percent-encoded byte stay as sent.
pub fn merge_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut merged = String::with_capacity(path.len());
    let mut after_slash = false;
    for c in path.chars() {
        if c == '/' && after_slash {
            continue;
        }
        after_slash = c == '/';
        merged.push(c);
    }
    Cow::Owned(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c";

    #[test]
    fn paths_and_methods_pick_one_route() {
        let get = Method::GET;
        let run = format!("{RUN_DETAIL_PREFIX}{ID}");
        assert_eq!(Route::parse(&get, &run), Ok((Route::RunDetail, ID)));
        assert_eq!(
            Route::parse(&Method::HEAD, &run),
            Ok((Route::RunDetail, ID))
        );
        // The id is checked by its handler, after the client is let in.
        assert_eq!(
            Route::parse(&get, "/v1/workflows/run/not-a-uuid"),
            Ok((Route::RunDetail, "not-a-uuid"))
        );
        assert_eq!(
            Route::parse(&get, "/v1/workflows/run/"),
            Ok((Route::RunDetail, ""))
        );
        assert_eq!(
            Route::parse(&get, "/v1/workflows/run/a%2Fb"),
            Ok((Route::RunDetail, "a%2Fb"))
        );
        assert_eq!(Route::parse(&get, "/healthz"), Ok((Route::Health, "")));
        assert_eq!(
            Route::parse(&get, &format!("{run}/events")),
            Ok((Route::RunEvents, ID))
        );
        assert_eq!(
            Route::parse(&Method::POST, &format!("{run}/events")),
            Err(Misroute::Method(Route::RunEvents))
        );
        for path in [
            "/v1/workflows/run",
            "/v1/workflows/run/x/y",
            "/v1/workflows/run/x/",
            "/v1/workflows/run/x/y/events",
            "/v1/workflows/run/x/events/",
            "/healthz/",
            "/",
            "/v1/workflows/logs",
        ] {
            assert_eq!(Route::parse(&get, path), Err(Misroute::NotFound), "{path}");
        }
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(
                Route::parse(&m, &run),
                Err(Misroute::Method(Route::RunDetail))
            );
            assert_eq!(
                Route::parse(&m, "/healthz"),
                Err(Misroute::Method(Route::Health))
            );
            assert_eq!(Route::parse(&m, "/nope"), Err(Misroute::NotFound));
        }
    }

    #[test]
    fn labels_are_the_metric_words() {
        assert_eq!(Route::label(Some(Route::RunDetail)), "run_detail");
        assert_eq!(Route::label(Some(Route::Health)), "healthz");
        assert_eq!(Route::label(None), "unknown");
        assert_eq!(Misroute::Method(Route::Health).route(), Some(Route::Health));
        assert_eq!(Misroute::NotFound.route(), None);
        assert!(!Route::RunDetail.takes_body() && !Route::Health.takes_body());
        assert!(Route::RunDetail.needs_token() && !Route::Health.needs_token());
    }

    #[test]
    fn repeated_slashes_merge_and_nothing_else_changes() {
        for (sent, routed) in [
            ("/v1//workflows/run/x", "/v1/workflows/run/x"),
            ("//v1///workflows//run//x", "/v1/workflows/run/x"),
            ("/v1/workflows/run/x", "/v1/workflows/run/x"),
            ("/", "/"),
            ("//", "/"),
            ("/v1/workflows/run/a%2F%2Fb", "/v1/workflows/run/a%2F%2Fb"),
            ("/v1//a%2f/%2F//b", "/v1/a%2f/%2F/b"),
            ("/%2e%2e//%2e%2e/x", "/%2e%2e/%2e%2e/x"),
        ] {
            assert_eq!(merge_slashes(sent), routed, "{sent}");
        }
        assert!(matches!(
            merge_slashes("/v1/workflows/run/x"),
            Cow::Borrowed(_)
        ));
    }

    proptest! {
        #[test]
        fn merging_only_drops_repeated_slashes(path in "[/a-z%2F.]{0,40}") {
            let merged = merge_slashes(&path);
            prop_assert!(!merged.contains("//"));
            // Same bytes once every `/` is taken out: nothing but slashes was dropped, so
            // percent-encoded bytes (`%2F` included) are untouched.
            prop_assert_eq!(merged.replace('/', ""), path.replace('/', ""));
            // The same non-empty segments, in order.
            let segments = |p: &str| p.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect::<Vec<_>>();
            prop_assert_eq!(segments(&merged), segments(&path));
            prop_assert_eq!(merged.starts_with('/'), path.starts_with('/'));
            prop_assert_eq!(merge_slashes(&merged), merged.clone());
        }
    }
}
