//! The gateway's own errors and their single mapping to HTTP.
//!
//! Invariant: every failure the gateway itself reports leaves through [`GatewayError::status`]
//! and [`GatewayError::to_response`], as Dify's JSON error shape `{"code","message","status"}`;
//! no message carries the upstream key, a client credential, or a raw upstream error text that
//! could.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::Serialize;

/// A failure answered by the gateway itself (upstream error answers are passed through as
/// received and are not this type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The path's run id is not a hyphenated UUID.
    #[error("workflow_run_id must be a hyphenated UUID")]
    InvalidRunId,
    /// A passed-through request names an id, or sends a body, its route cannot take; the
    /// message says which (fixed text, never the client's bytes).
    #[error("{0}")]
    InvalidParam(&'static str),
    /// The request's framing is refused (`Transfer-Encoding`, alone or beside a
    /// `Content-Length`: the request-smuggling shape) or its body broke off. The connection is
    /// closed after the answer.
    #[error(
        "request framing refused: no Transfer-Encoding, and a body must match its Content-Length"
    )]
    BadFraming,
    /// The request body exceeds [`crate::intake::MAX_BODY_BYTES`]. The connection is closed
    /// after the answer.
    #[error("request body too large")]
    RequestTooLarge,
    /// The request body did not arrive within `server.header_read_timeout`. The connection is
    /// closed after the answer.
    #[error("request body not received in time")]
    RequestTimeout,
    /// No route for this path.
    #[error("the requested URL was not found on this gateway")]
    RouteNotFound,
    /// The route exists but not for this method.
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// The upstream could not be reached (DNS, TCP, TLS).
    #[error("upstream connection failed")]
    UpstreamConnect,
    /// The upstream did not answer within `upstream.total_timeout`.
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    /// The upstream body exceeded `upstream.max_body_bytes`.
    #[error("upstream response body exceeds the configured limit")]
    UpstreamBodyTooLarge,
    /// The upstream broke the exchange (reset, truncated body, protocol error).
    #[error("upstream response was incomplete or malformed")]
    UpstreamProtocol,
    /// Clients are configured and the request carries no valid token.
    #[error("a valid gateway token is required: Authorization: Bearer <token>")]
    Unauthorized,
    /// The client exceeded its rate limit; retry after this many seconds.
    #[error("rate limit exceeded; retry later")]
    RateLimited { retry_after_secs: u64 },
    /// The client's `runs_per_minute` is spent; retry after this many seconds.
    #[error("run start limit exceeded (runs_per_minute); retry later")]
    TooManyRunStarts { retry_after_secs: u64 },
    /// The client already follows its `max_open_streams` streams.
    #[error("too many open streams for this client (max_open_streams); retry when one ends")]
    TooManyStreams { retry_after_secs: u64 },
    /// The client has used its `quota_runs_per_day` or `quota_tokens_per_day` (UTC days);
    /// retry after this many seconds (the next UTC midnight). See [`crate::usage`].
    #[error("daily quota exceeded (quota_runs_per_day or quota_tokens_per_day); retry after the next UTC midnight")]
    QuotaExceeded { retry_after_secs: u64 },
    /// The run, task or file belongs to another client of the app (see [`crate::ownership`]):
    /// answered exactly as Dify answers an unknown run, so its existence is not revealed.
    #[error("Workflow run not found.")]
    RunNotFound,
    /// The task belongs to another client of the app: Dify's 404 shape.
    #[error("Task not found.")]
    TaskNotFound,
    /// The file belongs to another client of the app: Dify's 404 for an unknown file.
    #[error("File not found.")]
    FileNotFound,
    /// The client may not read the app's logs: its app isolates clients and it lacks
    /// `read_app_logs`.
    #[error("this client may not read the app's logs (read_app_logs)")]
    LogsForbidden,
    /// Too many upstream requests in flight; the fetch could not get a slot in time.
    #[error("the gateway is overloaded; retry shortly")]
    Overloaded,
    /// The app's circuit breaker is open after repeated upstream failures.
    #[error("the upstream is failing; requests are paused briefly")]
    CircuitOpen { retry_after_secs: u64 },
    /// The run start's `Idempotency-Key` is held by a start still being answered.
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyKeyInUse,
    /// The `Idempotency-Key` was first used with another request (method, path or body).
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyMismatch,
    /// The `Idempotency-Key` started a run whose answer (an event stream) cannot be replayed;
    /// the ids let the client follow it.
    #[error("a run was already started with this Idempotency-Key: workflow_run_id {run}, task_id {task}; follow it at /v1/workflows/run/{run}")]
    IdempotentRunStarted { run: Box<str>, task: Box<str> },
    /// A webhook subscription from a client without a `webhook_url` (or from nobody, in open
    /// mode).
    #[error("this client has no webhook (webhook_url); a subscription needs one")]
    WebhookNotConfigured,
    /// The shared fetch ended without a result (it panicked); waiters get this.
    #[error("internal error while fetching from upstream")]
    Internal,
}

/// Dify's error body.
#[derive(Serialize)]
struct DifyError<'a> {
    code: &'a str,
    message: &'a str,
    status: u16,
}

impl GatewayError {
    /// The one HTTP status each error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRunId
            | GatewayError::InvalidParam(_)
            | GatewayError::BadFraming => StatusCode::BAD_REQUEST,
            GatewayError::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RouteNotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UpstreamConnect
            | GatewayError::UpstreamBodyTooLarge
            | GatewayError::UpstreamProtocol
            | GatewayError::Internal => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited { .. }
            | GatewayError::TooManyRunStarts { .. }
            | GatewayError::TooManyStreams { .. }
            | GatewayError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::RunNotFound | GatewayError::TaskNotFound | GatewayError::FileNotFound => {
                StatusCode::NOT_FOUND
            }
            GatewayError::LogsForbidden => StatusCode::FORBIDDEN,
            GatewayError::IdempotencyKeyInUse | GatewayError::IdempotentRunStarted { .. } => {
                StatusCode::CONFLICT
            }
            GatewayError::IdempotencyKeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::WebhookNotConfigured => StatusCode::BAD_REQUEST,
            GatewayError::Overloaded | GatewayError::CircuitOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Dify-style `code`; also the label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            GatewayError::InvalidRunId | GatewayError::InvalidParam(_) => "invalid_param",
            GatewayError::BadFraming => "bad_framing",
            GatewayError::RequestTooLarge => "request_too_large",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::RouteNotFound => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::UpstreamConnect => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamBodyTooLarge => "upstream_body_too_large",
            GatewayError::UpstreamProtocol => "upstream_bad_response",
            GatewayError::Internal => "internal_error",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::RateLimited { .. }
            | GatewayError::TooManyRunStarts { .. }
            | GatewayError::TooManyStreams { .. } => "too_many_requests",
            GatewayError::QuotaExceeded { .. } => "quota_exceeded",
            GatewayError::RunNotFound | GatewayError::TaskNotFound => "not_found",
            GatewayError::FileNotFound => "file_not_found",
            GatewayError::LogsForbidden => "forbidden",
            GatewayError::IdempotencyKeyInUse => "idempotency_key_in_use",
            GatewayError::IdempotencyKeyMismatch => "idempotency_key_mismatch",
            GatewayError::IdempotentRunStarted { .. } => "run_already_started",
            GatewayError::WebhookNotConfigured => "webhook_not_configured",
            GatewayError::Overloaded => "overloaded",
            GatewayError::CircuitOpen { .. } => "upstream_circuit_open",
        }
    }

    /// The refusal of a client over its daily quota, to retry after `wait` (what
    /// `Usage::check_quota` answers): whole seconds, at least one.
    pub fn quota_exceeded(wait: std::time::Duration) -> GatewayError {
        GatewayError::QuotaExceeded {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// The JSON body bytes.
    pub fn body(&self) -> Bytes {
        dify_error_body(self.as_str(), &self.to_string(), self.status())
    }

    /// The full response, its body whole (the caller picks the body type that carries it).
    pub fn to_response(&self) -> Response<Bytes> {
        let mut resp = Response::new(self.body());
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            GatewayError::MethodNotAllowed { allow } => {
                h.insert(ALLOW, HeaderValue::from_static(allow));
            }
            GatewayError::Unauthorized => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"dify-gateway\""),
                );
            }
            GatewayError::RateLimited { retry_after_secs }
            | GatewayError::TooManyRunStarts { retry_after_secs }
            | GatewayError::TooManyStreams { retry_after_secs }
            | GatewayError::QuotaExceeded { retry_after_secs }
            | GatewayError::CircuitOpen { retry_after_secs } => {
                h.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            GatewayError::Overloaded | GatewayError::IdempotencyKeyInUse => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::BadFraming
            | GatewayError::RequestTooLarge
            | GatewayError::RequestTimeout => {
                h.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// Serialises Dify's error shape.
pub fn dify_error_body(code: &str, message: &str, status: StatusCode) -> Bytes {
    let e = DifyError {
        code,
        message,
        status: status.as_u16(),
    };
    // Serialising a struct of strings and an integer cannot fail.
    Bytes::from(serde_json::to_vec(&e).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_difys_shape() {
        for e in [
            GatewayError::InvalidRunId,
            GatewayError::RouteNotFound,
            GatewayError::MethodNotAllowed { allow: "GET, HEAD" },
            GatewayError::InvalidParam("the request body is not valid JSON"),
            GatewayError::UpstreamConnect,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamBodyTooLarge,
            GatewayError::UpstreamProtocol,
            GatewayError::Internal,
            GatewayError::Unauthorized,
            GatewayError::RateLimited {
                retry_after_secs: 2,
            },
            GatewayError::Overloaded,
            GatewayError::BadFraming,
            GatewayError::RequestTooLarge,
            GatewayError::RequestTimeout,
            GatewayError::CircuitOpen {
                retry_after_secs: 3,
            },
            GatewayError::TooManyRunStarts {
                retry_after_secs: 4,
            },
            GatewayError::TooManyStreams {
                retry_after_secs: 1,
            },
            GatewayError::RunNotFound,
            GatewayError::QuotaExceeded {
                retry_after_secs: 60,
            },
            GatewayError::TaskNotFound,
            GatewayError::FileNotFound,
            GatewayError::LogsForbidden,
        ] {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(v["code"], e.as_str());
            assert_eq!(v["status"], e.status().as_u16());
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(GatewayError::InvalidRunId.as_str(), "invalid_param");
        for e in [
            GatewayError::BadFraming,
            GatewayError::RequestTooLarge,
            GatewayError::RequestTimeout,
        ] {
            assert_eq!(e.to_response().headers()[CONNECTION], "close", "{e:?}");
        }
        assert_eq!(GatewayError::RequestTooLarge.status(), 413);
        // A foreign client's run reads exactly as Dify's unknown run.
        let v: serde_json::Value =
            serde_json::from_slice(&GatewayError::RunNotFound.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "not_found", "message": "Workflow run not found.", "status": 404})
        );
        let r = GatewayError::TooManyRunStarts {
            retry_after_secs: 4,
        }
        .to_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "4");
        let r =
            GatewayError::quota_exceeded(std::time::Duration::from_millis(3_599_200)).to_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "3600");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["code"], "quota_exceeded");
        assert_eq!(v["status"], 429);
        assert_eq!(
            GatewayError::MethodNotAllowed { allow: "GET, HEAD" }
                .to_response()
                .headers()[ALLOW],
            "GET, HEAD"
        );
    }
}
