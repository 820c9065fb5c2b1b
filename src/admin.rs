//! The admin listener's routes: metrics, health, readiness, cache administration, usage
//! figures and the status page.
//!
//! Invariant: these routes are served only on the admin listener, never on the public one; when
//! an admin token is configured every route but `/healthz`, `/readyz` and the status page (`/`,
//! which holds no data) requires it, compared in constant time.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::body::Body;
use crate::clients::bearer_token;
use crate::error::dify_error_body;
use crate::gateway::Gateway;
use crate::run_id::RunId;
use crate::status::{StatusReport, PAGE};
use crate::usage::{day_of, to_csv, UsageError};

/// The admin side's state.
pub struct Admin {
    gateway: Arc<Gateway>,
    /// SHA-256 of the admin token, when one is configured.
    token_digest: Option<[u8; 32]>,
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::Full(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, dify_error_body(code, message, status))
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// The value of `name` in a query string (no percent-decoding: the values read here are
/// plain).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn to_json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(b) => json(status, b),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "encoding failed",
        ),
    }
}

#[derive(Serialize)]
struct Purged {
    purged: u64,
}

impl Admin {
    /// `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&format=csv]`: the figures of every
    /// client and app, by UTC day (inclusive; each defaults to today).
    async fn usage(&self, query: Option<&str>) -> Response<Body> {
        let today = day_of(SystemTime::now());
        let from = query_param(query, "from").unwrap_or(&today);
        let to = query_param(query, "to").unwrap_or(&today);
        let csv = match query_param(query, "format") {
            None | Some("json") => false,
            Some("csv") => true,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_param",
                    "format must be json or csv",
                )
            }
        };
        match self.gateway.usage().read(from, to).await {
            Ok(rows) if csv => {
                let mut r = Response::new(Body::from(Bytes::from(to_csv(&rows))));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                );
                r
            }
            Ok(rows) => to_json(StatusCode::OK, &rows),
            Err(e @ UsageError::BadRange(_)) => {
                error(StatusCode::BAD_REQUEST, "invalid_param", &e.to_string())
            }
            Err(e @ UsageError::Unavailable) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shared_tier_unavailable",
                &e.to_string(),
            ),
        }
    }

    pub fn new(gateway: Arc<Gateway>, token: Option<&SecretString>) -> Arc<Admin> {
        Arc::new(Admin {
            gateway,
            token_digest: token.map(|t| digest(t.expose_secret().as_bytes())),
        })
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(want) = &self.token_digest else {
            return true;
        };
        let presented = bearer_token(req.headers()).unwrap_or(b"");
        // Hashing first makes the comparison independent of the presented length.
        bool::from(digest(presented).ct_eq(want))
    }

    /// Answers one admin request.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Body> {
        let path = req.uri().path();
        let method = req.method();
        match (method, path) {
            (&Method::GET, "/healthz") => {
                return json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))
            }
            (&Method::GET, "/readyz") => {
                let report = self.gateway.readiness().report();
                let code = if report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return to_json(code, &report);
            }
            _ => {}
        }
        if (method, path) == (&Method::GET, "/") {
            // The page holds no data: it asks `/admin/status`, which is guarded.
            let mut r = Response::new(Body::Full(Bytes::from_static(PAGE.as_bytes())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            return r;
        }
        if !self.authorized(&req) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin token required",
            );
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dify-gateway-admin\""),
            );
            return r;
        }
        match (method, path) {
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Body::from(Bytes::from(self.gateway.metrics_text())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/admin/cache/stats") => {
                to_json(StatusCode::OK, &self.gateway.cache_report())
            }
            (&Method::GET, "/admin/status") => {
                to_json(StatusCode::OK, &StatusReport::of(&self.gateway).await)
            }
            (&Method::GET, "/admin/usage") => self.usage(req.uri().query()).await,
            (&Method::GET, "/admin/reload") => {
                to_json(StatusCode::OK, &self.gateway.reloads().report())
            }
            (&Method::DELETE, "/admin/cache") => {
                let n = self.gateway.purge_all().await;
                to_json(StatusCode::OK, &Purged { purged: n })
            }
            (&Method::DELETE, p) if p.starts_with("/admin/cache/runs/") => {
                let id = &p["/admin/cache/runs/".len()..];
                let Ok(run) = RunId::parse(id) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_param",
                        "workflow_run_id must be a hyphenated UUID",
                    );
                };
                let app = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")));
                match self.gateway.purge_run(run, app).await {
                    Some(n) => to_json(StatusCode::OK, &Purged { purged: n }),
                    None => error(StatusCode::NOT_FOUND, "not_found", "no such app"),
                }
            }
            (
                _,
                "/" | "/metrics" | "/admin/cache/stats" | "/admin/reload" | "/admin/status"
                | "/admin/usage",
            ) => not_allowed("GET"),
            (_, "/admin/cache") => not_allowed("DELETE"),
            (_, p) if p.starts_with("/admin/cache/runs/") => not_allowed("DELETE"),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin route"),
        }
    }
}
