//! The routes: which of the gateway's answers a request asks for, read from its method and path.
//!
//! Invariant: a request is routed on its path with repeated `/` merged and nothing else changed
//! (percent-encoded bytes stay as sent); each route says which methods it serves, whether it
//! takes a request body and whether it is only for clients, and its `as_str()` is the `route`
//! word of logs and metrics. Adding a route is a variant here and a file beside this one for its
//! handler.

pub mod health;
pub mod passthrough;
pub mod run_detail;
pub mod run_events;
pub mod subscribe;
pub mod wait;

use std::borrow::Cow;

use http::Method;

/// Path prefix of the run-detail route, as Dify serves it under `/v1`.
pub const RUN_DETAIL_PREFIX: &str = "/v1/workflows/run/";

/// Path suffix of the status-stream route, after the run id.
pub const RUN_EVENTS_SUFFIX: &str = "/events";

/// Path suffix of the webhook-subscription route, after the run id.
pub const RUN_SUBSCRIBE_SUFFIX: &str = "/subscribe";

/// Prefix of every Dify path.
pub const API_PREFIX: &str = "/v1/";

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
    /// `POST /v1/workflows/run/{id}/subscribe`: announce the run's end to the client's webhook.
    RunSubscribe,
    /// `GET`/`HEAD /healthz`: the process is up.
    Health,
    /// `POST /v1/workflows/run`: start a run of the app's published workflow.
    RunStart,
    /// `POST /v1/workflows/{workflow_id}/run`: start a run of one workflow version.
    RunStartVersion,
    /// `POST /v1/workflows/tasks/{task_id}/stop`: stop a streaming run.
    TaskStop,
    /// `GET /v1/workflows/logs`: the app's run logs (query passed through).
    Logs,
    /// `GET /v1/workflow/{workflow_run_id}/events`: resume a run's event stream.
    Events,
    /// `POST /v1/files/upload`: a multipart upload, streamed.
    Upload,
    /// `GET /v1/files/{file_id}/preview`.
    FilePreview,
    /// `GET /v1/info`.
    Info,
    /// `GET /v1/parameters`.
    Parameters,
    /// `GET /v1/meta`.
    Meta,
    /// `GET /v1/site`.
    Site,
    /// `GET /v1/end-users/{id}`.
    EndUser,
    /// `POST /v1/audio-to-text` (multipart).
    AudioToText,
    /// `POST /v1/text-to-audio` (JSON).
    TextToAudio,
    /// `GET`/`POST /v1/form/human_input/{form_token}`.
    HumanInput,
    /// Any other path under `/v1/`: Dify's 404 unless `passthrough.allow_unlisted`.
    Unlisted,
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
                _ => match rest.strip_suffix(RUN_SUBSCRIBE_SUFFIX) {
                    Some(id) if !id.contains('/') => (Route::RunSubscribe, id),
                    _ => Route::parse_api(&path[API_PREFIX.len()..]),
                },
            },
            _ if path == HEALTH_PATH => (Route::Health, ""),
            _ => match path.strip_prefix(API_PREFIX) {
                Some(rest) => Route::parse_api(rest),
                None => return Err(Misroute::NotFound),
            },
        };
        if !route.allows(method) {
            return Err(Misroute::Method(route));
        }
        Ok((route, param))
    }

    /// The passed-through route of `rest`, the path after `/v1/`, and its path parameter.
    fn parse_api(rest: &str) -> (Route, &str) {
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            ["workflows", "run"] => (Route::RunStart, ""),
            ["workflows", "logs"] => (Route::Logs, ""),
            ["workflows", "tasks", task, "stop"] => (Route::TaskStop, task),
            ["workflows", workflow, "run"] => (Route::RunStartVersion, workflow),
            ["workflow", run, "events"] => (Route::Events, run),
            ["files", "upload"] => (Route::Upload, ""),
            ["files", file, "preview"] => (Route::FilePreview, file),
            ["info"] => (Route::Info, ""),
            ["parameters"] => (Route::Parameters, ""),
            ["meta"] => (Route::Meta, ""),
            ["site"] => (Route::Site, ""),
            ["end-users", id] => (Route::EndUser, id),
            ["audio-to-text"] => (Route::AudioToText, ""),
            ["text-to-audio"] => (Route::TextToAudio, ""),
            ["form", "human_input", token] => (Route::HumanInput, token),
            _ => (Route::Unlisted, ""),
        }
    }

    /// Does the route serve `method`?
    #[inline]
    pub fn allows(self, method: &Method) -> bool {
        let get = method == Method::GET || method == Method::HEAD;
        let post = method == Method::POST;
        match self {
            Route::RunDetail
            | Route::RunEvents
            | Route::Health
            | Route::Logs
            | Route::Events
            | Route::FilePreview
            | Route::Info
            | Route::Parameters
            | Route::Meta
            | Route::Site
            | Route::EndUser => get,
            Route::RunStart
            | Route::RunStartVersion
            | Route::RunSubscribe
            | Route::TaskStop
            | Route::Upload
            | Route::AudioToText
            | Route::TextToAudio => post,
            Route::HumanInput => get || post,
            Route::Unlisted => true,
        }
    }

    /// The methods [`Route::allows`], for `Allow`.
    pub fn allowed(self) -> &'static str {
        match self {
            Route::RunStart
            | Route::RunStartVersion
            | Route::RunSubscribe
            | Route::TaskStop
            | Route::Upload
            | Route::AudioToText
            | Route::TextToAudio => "POST",
            Route::HumanInput => "GET, HEAD, POST",
            _ => "GET, HEAD",
        }
    }

    /// Is the route passed to the upstream (as opposed to answered by the gateway or its cache)?
    pub fn is_passthrough(self) -> bool {
        !matches!(self, Route::RunDetail | Route::RunSubscribe | Route::Health)
    }

    /// Does the route take a request body? A route that does not still reads a small one (some
    /// SDKs send `{}` with every GET) and drops it, see [`crate::intake::discard_body`].
    pub fn takes_body(self) -> bool {
        matches!(
            self,
            Route::RunStart
                | Route::RunStartVersion
                | Route::TaskStop
                | Route::Upload
                | Route::AudioToText
                | Route::TextToAudio
                | Route::HumanInput
                | Route::Unlisted
        )
    }

    /// Is the route only for clients (a token, when clients are configured, under the
    /// client's rate limit)? Routes that are not answer anyone.
    pub fn needs_token(self) -> bool {
        !matches!(self, Route::Health)
    }

    /// The `route` word of logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::RunDetail => "run_detail",
            Route::RunEvents => "run_events",
            Route::RunSubscribe => "run_subscribe",
            Route::Health => "healthz",
            Route::RunStart => "run_start",
            Route::RunStartVersion => "run_start_version",
            Route::TaskStop => "task_stop",
            Route::Logs => "logs",
            Route::Events => "events",
            Route::Upload => "file_upload",
            Route::FilePreview => "file_preview",
            Route::Info => "info",
            Route::Parameters => "parameters",
            Route::Meta => "meta",
            Route::Site => "site",
            Route::EndUser => "end_user",
            Route::AudioToText => "audio_to_text",
            Route::TextToAudio => "text_to_audio",
            Route::HumanInput => "human_input",
            Route::Unlisted => "unlisted",
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
        for path in ["/healthz/", "/", "/v2/workflows/run", "/v1"] {
            assert_eq!(Route::parse(&get, path), Err(Misroute::NotFound), "{path}");
        }
        // Other paths under `/v1/` are the unlisted route, refused unless configured.
        for path in [
            "/v1/workflows/run/x/y",
            "/v1/workflows/run/x/",
            "/v1/workflows/run/x/y/events",
            "/v1/workflows/run/x/events/",
            "/v1/chat-messages",
        ] {
            assert_eq!(
                Route::parse(&get, path),
                Ok((Route::Unlisted, "")),
                "{path}"
            );
        }
        let post = Method::POST;
        for (path, route, param) in [
            ("/v1/workflows/run", Route::RunStart, ""),
            ("/v1/workflows/wf/run", Route::RunStartVersion, "wf"),
            ("/v1/workflows/tasks/t/stop", Route::TaskStop, "t"),
            ("/v1/files/upload", Route::Upload, ""),
            ("/v1/audio-to-text", Route::AudioToText, ""),
            ("/v1/text-to-audio", Route::TextToAudio, ""),
            ("/v1/form/human_input/tok", Route::HumanInput, "tok"),
        ] {
            assert_eq!(Route::parse(&post, path), Ok((route, param)), "{path}");
            assert_eq!(
                Route::parse(&get, path).map(|r| r.0),
                if route == Route::HumanInput {
                    Ok(route)
                } else {
                    Err(Misroute::Method(route))
                },
                "{path}"
            );
        }
        for (path, route, param) in [
            ("/v1/workflows/logs", Route::Logs, ""),
            ("/v1/workflow/r/events", Route::Events, "r"),
            ("/v1/files/f/preview", Route::FilePreview, "f"),
            ("/v1/info", Route::Info, ""),
            ("/v1/parameters", Route::Parameters, ""),
            ("/v1/meta", Route::Meta, ""),
            ("/v1/site", Route::Site, ""),
            ("/v1/end-users/u", Route::EndUser, "u"),
        ] {
            assert_eq!(Route::parse(&get, path), Ok((route, param)), "{path}");
            assert_eq!(
                Route::parse(&post, path),
                Err(Misroute::Method(route)),
                "{path}"
            );
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
