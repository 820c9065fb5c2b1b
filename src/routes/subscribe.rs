//! `POST /v1/workflows/run/{id}/subscribe`: a client asks to have a run's end announced to its
//! webhook (see [`crate::webhooks`]).
//!
//! Invariant: a subscription is taken only for a run the client may read, answered exactly as
//! its run detail would be otherwise (a foreign or unknown run gets Dify's 404, an upstream
//! failure its error): the run's current detail is read first, through the cache and the
//! coalesced fetch like any read. A client without a webhook is refused before anything is
//! read; a subscription over `webhooks.max_pending` gets 503 `overloaded`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::Body;
use crate::clients::Client;
use crate::error::GatewayError;
use crate::run_id::RunId;
use crate::upstream::App;
use crate::webhooks::{Subscribed, Webhooks};

use super::run_detail::{RunDetail, Served};

/// Answers a subscription of `client` to `run` of `app`.
pub async fn serve(
    detail: &RunDetail,
    webhooks: &Arc<Webhooks>,
    app: &Arc<App>,
    run: RunId,
    rid: &HeaderValue,
    client: Option<&Arc<Client>>,
) -> Result<(Response<Body>, Served), GatewayError> {
    let Some(c) = client.filter(|c| webhooks.has_target(&c.name)) else {
        return Err(GatewayError::WebhookNotConfigured);
    };
    let (resp, served) = detail.serve(app, run, rid, client).await;
    let stored = match resp.body() {
        Body::Entry(s) if s.status == StatusCode::OK => Arc::clone(s),
        // Not found, foreign, or an upstream failure: answered as the run detail is.
        _ => return Ok((resp, served)),
    };
    let subscribed = webhooks.subscribe(app, run, &c.name, &stored).await;
    if subscribed == Subscribed::Dropped {
        // Over `webhooks.max_pending` (counted as a dropped delivery).
        let e = GatewayError::Overloaded;
        let (parts, body) = e.to_response().into_parts();
        let served = Served {
            error: Some(e.as_str()),
            ..served
        };
        return Ok((Response::from_parts(parts, Body::Full(body)), served));
    }
    #[derive(serde::Serialize)]
    struct Accepted<'a> {
        workflow_run_id: String,
        status: Option<&'a str>,
        subscription: &'static str,
    }
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    let status = serde_json::from_slice::<Status<'_>>(&stored.body)
        .ok()
        .and_then(|s| s.status);
    let body = serde_json::to_vec(&Accepted {
        workflow_run_id: run.to_string(),
        status,
        subscription: subscribed.as_str(),
    })
    .unwrap_or_default();
    let mut out = Response::new(Body::Full(Bytes::from(body)));
    *out.status_mut() = StatusCode::ACCEPTED;
    out.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok((out, served))
}
