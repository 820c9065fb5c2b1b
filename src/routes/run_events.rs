//! `GET /v1/workflows/run/{id}/events`: a run's status as a `text/event-stream`, one `status`
//! event per change, through the run's one watcher ([`crate::watch`]).
//!
//! Invariant: the first event is the current state (skipped when `Last-Event-ID` is its ETag),
//! then one event per change of the body, in order; the stream ends after the first event whose
//! run is no longer running, when the watcher ends (shutdown), or when the client leaves. Each
//! event is `event: status`, `id: <etag>` and the body as received, one `data:` line per line
//! of it; a `: ping` comment goes out after `stream.heartbeat` with nothing sent (on the
//! waiters' shared timer, so up to [`crate::deadlines::TICK`] early). An answer the
//! stream cannot start from (an error, a run not found) is sent as the run-detail route sends it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use tokio::sync::mpsc;

use crate::body::Body;
use crate::cache::{CacheKey, Stored};
use crate::clients::Client;
use crate::error::GatewayError;
use crate::run_id::RunId;
use crate::upstream::App;
use crate::watch::{is_running, Full, Waiter};

use super::run_detail::{RunDetail, Served, X_CACHE};

/// `Last-Event-ID` request header.
static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
/// `X-Accel-Buffering: no`: nginx in front must pass events on as they come.
static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Events buffered towards a slow client before the stream waits for it.
const QUEUE: usize = 8;

/// The heartbeat comment.
const PING: &[u8] = b": ping\n\n";

/// Answers a status-stream request for `run` of `app`.
pub async fn serve(
    detail: &RunDetail,
    app: &Arc<App>,
    run: RunId,
    rid: &HeaderValue,
    client: Option<&Arc<Client>>,
    req: &HeaderMap,
    heartbeat: Duration,
) -> (Response<Body>, Served) {
    let (resp, served) = detail.serve(app, run, rid, client).await;
    let first = match resp.body() {
        Body::Entry(s) if s.status.is_success() && s.class.is_some() => Arc::clone(s),
        _ => return (resp, served),
    };
    let waiter = if is_running(&first) && !detail.watchers().stopping() {
        let key = CacheKey { app: app.id, run };
        match detail.watchers().join(app, key, Arc::clone(&first), client) {
            Ok(w) => Some(w),
            Err(full) => {
                let e = match full {
                    Full::Gateway => GatewayError::Overloaded,
                    Full::Client => GatewayError::RateLimited {
                        retry_after_secs: 1,
                    },
                };
                let mut resp = e.to_response().map(Body::Full);
                resp.headers_mut()
                    .insert(X_CACHE.clone(), served.cache.header());
                let served = Served {
                    error: Some(e.as_str()),
                    ..served
                };
                return (resp, served);
            }
        }
    } else {
        None
    };
    let last_seen = req.get(&LAST_EVENT_ID).cloned();
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(stream(first, waiter, last_seen, tx, heartbeat));
    let mut resp = Response::new(Body::Events(rx));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
    h.insert(X_CACHE.clone(), served.cache.header());
    (resp, served)
}

/// Sends the events of one stream until the run stops running, the watcher ends or the client
/// leaves.
async fn stream(
    first: Arc<Stored>,
    mut waiter: Option<Waiter>,
    last_seen: Option<HeaderValue>,
    tx: mpsc::Sender<Bytes>,
    heartbeat: Duration,
) {
    // The watcher may already hold a newer state than the answer the stream started from.
    let mut cur = waiter.as_mut().map_or(first, Waiter::seen);
    if last_seen.as_ref() != Some(&cur.etag) && tx.send(event(&cur)).await.is_err() {
        return;
    }
    while is_running(&cur) {
        let Some(w) = waiter.as_mut() else { return };
        let mut quiet = w.deadline(tokio::time::Instant::now() + heartbeat);
        tokio::select! {
            next = w.changed() => match next {
                Some(s) => {
                    cur = s;
                    if tx.send(event(&cur)).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            _ = quiet.reached() => {
                if tx.send(Bytes::from_static(PING)).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// One `status` event: the ETag as its id, the body (its trailing line end dropped) as one
/// `data:` line per line, as the SSE format requires for bodies holding line ends.
pub fn event(s: &Stored) -> Bytes {
    let body = s.body.as_ref();
    let body = body
        .strip_suffix(b"\r\n")
        .or_else(|| body.strip_suffix(b"\n"))
        .or_else(|| body.strip_suffix(b"\r"))
        .unwrap_or(body);
    let mut out = BytesMut::with_capacity(body.len() + s.etag.len() + 40);
    out.put_slice(b"event: status\nid: ");
    out.put_slice(s.etag.as_bytes());
    out.put_slice(b"\n");
    let mut rest = body;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
        out.put_slice(b"data: ");
        match end {
            None => {
                out.put_slice(rest);
                out.put_slice(b"\n");
                break;
            }
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_slice(b"\n");
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
        }
    }
    out.put_slice(b"\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn stored(body: &'static [u8]) -> Stored {
        Stored {
            status: StatusCode::OK,
            headers: Arc::default(),
            body: Bytes::from_static(body),
            etag: HeaderValue::from_static("\"t\""),
            class: None,
            ttl: None,
            fetched_at: Instant::now(),
        }
    }

    #[test]
    fn an_event_has_one_data_line_per_body_line() {
        assert_eq!(
            event(&stored(b"{\"status\":\"running\"}\n")),
            "event: status\nid: \"t\"\ndata: {\"status\":\"running\"}\n\n"
        );
        assert_eq!(
            event(&stored(b"a\nb\r\nc\rd")),
            "event: status\nid: \"t\"\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(event(&stored(b"")), "event: status\nid: \"t\"\ndata: \n\n");
    }
}
