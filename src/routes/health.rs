//! `GET /healthz`: the process is up and serving.
//!
//! Invariant: the answer depends on nothing but the process being able to answer — no client
//! token, no cache, no upstream — so a load balancer's check never costs an upstream request.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::Response;

use crate::body::Body;

/// `{"status":"ok"}`.
pub fn answer() -> Response<Body> {
    let mut r = Response::new(Body::from("{\"status\":\"ok\"}"));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
