//! The passed-through routes: the Workflow App API beyond the run detail, each sent to the
//! client's app by [`crate::passthrough`].
//!
//! Invariant: a path's id is checked before anything reaches the upstream (UUIDs where Dify
//! issues UUIDs, a plain token segment for a form token); an unlisted path is passed only when
//! `passthrough.allow_unlisted` is set, and never with a `.`/`..` segment that a server upstream
//! could resolve outside `/v1`.

use http::Method;

use crate::error::GatewayError;
use crate::passthrough::BodyKind;
use crate::rewrite::{query, UserPrefix};
use crate::run_id::RunId;

use super::Route;

/// Longest form token accepted in a path.
const MAX_TOKEN_LEN: usize = 256;

/// How a passed-through route is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub body: BodyKind,
    pub follows_run: bool,
}

/// The plan for `route` and `method`, after its path parameter `param` is checked.
pub fn plan(
    route: Route,
    method: &Method,
    param: &str,
    content_type: Option<&str>,
) -> Result<Plan, GatewayError> {
    let uuid = |what: &'static str| {
        RunId::parse(param)
            .map(|_| ())
            .map_err(|_| GatewayError::InvalidParam(what))
    };
    match route {
        Route::RunStartVersion => uuid("workflow_id must be a hyphenated UUID")?,
        Route::TaskStop => uuid("task_id must be a hyphenated UUID")?,
        Route::Events => uuid("workflow_run_id must be a hyphenated UUID")?,
        Route::FilePreview => uuid("file_id must be a hyphenated UUID")?,
        Route::EndUser => uuid("end_user_id must be a hyphenated UUID")?,
        Route::HumanInput if !is_token(param) => {
            return Err(GatewayError::InvalidParam(
                "form_token is not a valid token",
            ))
        }
        _ => {}
    }
    let is_get = method == Method::GET || method == Method::HEAD;
    let body = match route {
        Route::RunStart | Route::RunStartVersion | Route::TaskStop | Route::TextToAudio => {
            BodyKind::Json
        }
        Route::HumanInput if !is_get => BodyKind::Json,
        Route::Upload | Route::AudioToText => BodyKind::Multipart,
        Route::Unlisted if is_get => BodyKind::None,
        Route::Unlisted => match content_type.map(str::to_ascii_lowercase) {
            Some(t) if t.starts_with("application/json") => BodyKind::Json,
            Some(t) if t.starts_with("multipart/form-data") => BodyKind::Multipart,
            _ => BodyKind::Raw,
        },
        _ => BodyKind::None,
    };
    Ok(Plan {
        body,
        follows_run: matches!(
            route,
            Route::RunStart | Route::RunStartVersion | Route::Events
        ),
    })
}

/// The upstream path and query for a request to `path` (under `/v1`, slashes merged) with
/// `query`, the client's `user` values prefixed; `None` for a path with a dot segment.
pub fn upstream_path(
    path: &str,
    query: Option<&str>,
    prefix: Option<&UserPrefix>,
) -> Option<String> {
    let rest = path.strip_prefix("/v1")?;
    if rest.split('/').any(is_dot_segment) {
        return None;
    }
    let mut out = rest.to_owned();
    if let Some(q) = query {
        out.push('?');
        match prefix {
            Some(p) => out.push_str(&query::prefix_user(q, p)),
            None => out.push_str(q),
        }
    }
    Some(out)
}

/// `.` or `..`, percent-encoded or not.
fn is_dot_segment(s: &str) -> bool {
    let lower = s.to_ascii_lowercase().replace("%2e", ".");
    lower == "." || lower == ".."
}

/// A form token: 1 to [`MAX_TOKEN_LEN`] URL-safe characters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c";

    #[test]
    fn ids_are_checked_and_bodies_planned() {
        let post = Method::POST;
        assert!(plan(Route::TaskStop, &post, ID, None).is_ok());
        assert_eq!(
            plan(Route::TaskStop, &post, "x", None),
            Err(GatewayError::InvalidParam(
                "task_id must be a hyphenated UUID"
            ))
        );
        assert!(plan(Route::Events, &Method::GET, "../x", None).is_err());
        assert!(plan(Route::HumanInput, &post, "a b", None).is_err());
        let p = plan(Route::RunStart, &post, "", None).unwrap();
        assert_eq!(p.body, BodyKind::Json);
        assert!(p.follows_run);
        assert_eq!(
            plan(Route::Upload, &post, "", None).unwrap().body,
            BodyKind::Multipart
        );
        assert_eq!(
            plan(Route::Unlisted, &post, "", Some("application/json"))
                .unwrap()
                .body,
            BodyKind::Json
        );
        assert_eq!(
            plan(Route::Unlisted, &post, "", Some("text/plain"))
                .unwrap()
                .body,
            BodyKind::Raw
        );
    }

    #[test]
    fn paths_keep_their_bytes_and_lose_no_dot_segments() {
        let p = UserPrefix::new("team-a:").unwrap();
        assert_eq!(
            upstream_path("/v1/workflows/logs", Some("page=1&user=u"), Some(&p)).as_deref(),
            Some("/workflows/logs?page=1&user=team-a%3Au")
        );
        assert_eq!(
            upstream_path("/v1/x%2Fy", None, None).as_deref(),
            Some("/x%2Fy")
        );
        assert_eq!(upstream_path("/v1/a/../admin", None, None), None);
        assert_eq!(upstream_path("/v1/a/%2E%2e/admin", None, None), None);
    }
}
