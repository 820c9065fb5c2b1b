//! What the mock sends back: canned replies (bytes, hangs, broken bodies) and Dify's bodies and
//! error shapes.
//!
//! Invariant: every answer the mock writes goes through here, so each one carries Dify's
//! `X-Version`/`X-Env` headers and its error shape `{"code", "message", "status"}`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Channel, Full};
use uuid::Uuid;

use super::Body;

/// What the mock answers for one run id (or, injected with [`super::MockDify::fail_next`], for
/// one path).
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete answer with these exact bytes.
    Bytes {
        status: StatusCode,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Never answers (within an hour).
    Hang,
    /// Sends the head (with a `Content-Length` of `claimed`) and `partial`, then breaks the
    /// connection.
    ResetMidBody { partial: Bytes, claimed: usize },
    /// Sends a 200 head and then body chunks forever.
    StreamForever,
}

impl Reply {
    /// A 200 run body in Dify's field order and serialisation (`\/` escapes, `\uXXXX`,
    /// trailing newline), for `status` (a JSON literal such as `"\"running\""` or `"null"`).
    pub fn run(id: &str, status: &str) -> Reply {
        Reply::ok_json(run_body(id, status, 256))
    }

    /// A 200 run body whose outputs hold about `output_bytes` of text.
    pub fn run_sized(id: &str, status: &str, output_bytes: usize) -> Reply {
        Reply::ok_json(run_body(id, status, output_bytes))
    }

    /// A 200 with these bytes as `application/json`.
    pub fn ok_json(body: impl Into<Bytes>) -> Reply {
        Reply::json(StatusCode::OK, body)
    }

    /// Any status with these bytes as `application/json` and Dify's `X-Version`/`X-Env`.
    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply::with_type(status, "application/json", body)
    }

    /// Any status with these bytes as `content_type` and Dify's `X-Version`/`X-Env`.
    pub fn with_type(
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) -> Reply {
        Reply::Bytes {
            status,
            content_type,
            headers: vec![
                ("x-version", "1.9.2".into()),
                ("x-env", "PRODUCTION".into()),
            ],
            body: body.into(),
        }
    }

    /// Dify's JSON error body for `status`, `code` and `message`.
    pub fn dify_error(status: StatusCode, code: &str, message: &str) -> Reply {
        let body = format!(
            "{{\"code\": \"{code}\", \"message\": \"{message}\", \"status\": {}}}\n",
            status.as_u16()
        );
        Reply::json(status, body)
    }

    /// Cloudflare's HTML rate-limit page, with `Retry-After`.
    pub fn cloudflare_429(retry_after_secs: u32) -> Reply {
        Reply::Bytes {
            status: StatusCode::TOO_MANY_REQUESTS,
            content_type: "text/html; charset=UTF-8",
            headers: vec![("retry-after", retry_after_secs.to_string())],
            body: Bytes::from_static(
                b"<!DOCTYPE html><html><head><title>Access denied | api.dify.ai used Cloudflare to restrict access</title></head><body>error code: 1015</body></html>",
            ),
        }
    }
}

/// A run body as Dify serialises it.
pub fn run_body(id: &str, status: &str, output_bytes: usize) -> Bytes {
    let finished = if status.contains("running") || status == "null" || status.contains("paused") {
        "null".to_owned()
    } else {
        "1732787401".to_owned()
    };
    // Whole units, so no escape sequence is ever cut.
    const UNIT: &str = "Caf\\u00e9 report \\/ summary. ";
    let text = UNIT.repeat(output_bytes / UNIT.len() + 1);
    Bytes::from(format!(
        "{{\"id\": \"{id}\", \"workflow_id\": \"{DEFAULT_WORKFLOW_ID}\", \"status\": {status}, \"inputs\": \"{{\\\"query\\\": \\\"summarise\\\", \\\"sys.files\\\": [], \\\"sys.user_id\\\": \\\"abc-123\\\", \\\"sys.app_id\\\": \\\"5c3d7f0e-1a2b-4c5d-8e9f-0a1b2c3d4e5f\\\"}}\", \"outputs\": {{\"text\": \"{text}\"}}, \"error\": null, \"total_steps\": 4, \"total_tokens\": 1234, \"created_at\": 1732787400, \"finished_at\": {finished}, \"elapsed_time\": 1.234567}}\n"
    ))
}

/// The workflow every run belongs to unless started as `/workflows/{workflow_id}/run`.
pub(super) const DEFAULT_WORKFLOW_ID: &str = "8d2b5a8e-3f1c-4e8b-9a41-6f0f7a3c2b11";

/// The status (a JSON literal) an auto-mode run ends in: mostly `"succeeded"`, `"failed"` for
/// one id in ten and `"partial-succeeded"` for another.
pub fn auto_final_status(id: &Uuid) -> &'static str {
    match id.as_bytes()[15] % 10 {
        0 => "\"failed\"",
        1 => "\"partial-succeeded\"",
        _ => "\"succeeded\"",
    }
}

/// Seconds since the epoch, for bodies that want a current time.
pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A whole body.
pub(super) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A 200 JSON answer with `body`.
pub(super) fn ok(body: impl Into<Bytes>) -> Response<Body> {
    reply_response(Reply::ok_json(body))
}

/// Dify's refusal of a request, answered in its error shape `{"code", "message", "status"}`.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
}

impl Refusal {
    pub(super) fn answer(&self) -> Response<Body> {
        reply_response(Reply::dify_error(self.status, self.code, &self.message))
    }
}

/// Dify's refusal with `status`, `code` and `message`.
pub(super) fn error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<Cow<'static, str>>,
) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// Dify's 400 `invalid_param`.
pub(super) fn invalid_param(message: impl Into<Cow<'static, str>>) -> Refusal {
    error(StatusCode::BAD_REQUEST, "invalid_param", message)
}

/// Dify's 404 `not_found` for `what` (`"Workflow run"`, `"End user"`, ...).
pub(super) fn not_found(what: &str) -> Refusal {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{what} not found."),
    )
}

/// The answer for `r`, waiting out a [`Reply::Hang`]; a 429 always says when to come back.
pub(super) async fn respond(r: Reply) -> Response<Body> {
    if let Reply::Hang = r {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut resp = reply_response(r);
    if resp.status() == StatusCode::TOO_MANY_REQUESTS && !resp.headers().contains_key(RETRY_AFTER) {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The answer for a reply that does not wait (a hang is answered at once with nothing).
pub(super) fn reply_response(r: Reply) -> Response<Body> {
    match r {
        Reply::Bytes {
            status,
            content_type,
            headers,
            body,
        } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            for (k, v) in headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(k, v);
                }
            }
            resp
        }
        Reply::Hang => Response::new(full(Bytes::new())),
        Reply::ResetMidBody { partial, claimed } => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(partial).await;
                tx.abort(std::io::Error::other("reset"));
            });
            let mut resp = Response::new(body.boxed());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(claimed));
            resp
        }
        Reply::StreamForever => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                let _ = tx
                    .send_data(Bytes::from_static(b"{\"status\": \"running\", \"pad\": \""))
                    .await;
                while tx.send_data(chunk.clone()).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let mut resp = Response::new(body.boxed());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
    }
}
