//! A mock Dify for local trials, tests and benchmarks: Dify's run-detail endpoint with its real
//! body layout, error bodies and status values, plus injectable faults.
//!
//! Invariant: the mock answers exactly what it was told per run id (or, in auto mode, a run that
//! goes from `running` to a terminal status after a set time) and counts every request it
//! receives, so tests can assert how many reached the upstream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Channel, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use uuid::Uuid;

type Body = BoxBody<Bytes, std::io::Error>;

/// What the mock answers for one run id.
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
        Reply::Bytes {
            status,
            content_type: "application/json",
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
        "{{\"id\": \"{id}\", \"workflow_id\": \"8d2b5a8e-3f1c-4e8b-9a41-6f0f7a3c2b11\", \"status\": {status}, \"inputs\": \"{{\\\"query\\\": \\\"summarise\\\", \\\"sys.files\\\": [], \\\"sys.user_id\\\": \\\"abc-123\\\", \\\"sys.app_id\\\": \\\"5c3d7f0e-1a2b-4c5d-8e9f-0a1b2c3d4e5f\\\"}}\", \"outputs\": {{\"text\": \"{text}\"}}, \"error\": null, \"total_steps\": 4, \"total_tokens\": 1234, \"created_at\": 1732787400, \"finished_at\": {finished}, \"elapsed_time\": 1.234567}}\n"
    ))
}

/// Auto mode: every valid run id becomes a run that is `running` for `running_for` after its
/// first request, then terminal — except ids starting with [`UNKNOWN_RUN_PREFIX`], which are
/// unknown runs (404).
#[derive(Debug, Clone, Copy)]
pub struct AutoRuns {
    pub running_for: Duration,
    pub output_bytes: usize,
}

/// In auto mode, run ids starting with this are unknown: Dify's 404 `not_found`.
pub const UNKNOWN_RUN_PREFIX: &str = "00000000-";

#[derive(Default)]
struct State {
    /// Keys accepted (a rotation accepts old and new for a while, then only the new).
    keys: Mutex<Vec<String>>,
    replies: Mutex<HashMap<String, std::collections::VecDeque<Reply>>>,
    auto: Option<AutoRuns>,
    first_seen: Mutex<HashMap<String, Instant>>,
    delay_ms: AtomicU64,
    total: AtomicU64,
    per_path: Mutex<HashMap<String, u64>>,
    last_headers: Mutex<Option<HeaderMap>>,
    /// Set to true to stop accepting and cut every open connection.
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running mock Dify; cheap to clone, stops when the runtime stops.
#[derive(Clone)]
pub struct MockDify {
    state: Arc<State>,
    addr: SocketAddr,
}

impl MockDify {
    /// Starts on `127.0.0.1:0` expecting `key`; runs must be set with [`MockDify::set`].
    pub async fn start(key: &str) -> std::io::Result<MockDify> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(l, key, None))
    }

    /// Starts on `listener` in auto mode.
    pub fn serve(listener: TcpListener, key: &str, auto: Option<AutoRuns>) -> MockDify {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(State {
            keys: Mutex::new(vec![key.to_owned()]),
            auto,
            stop: Some(stop_tx),
            ..State::default()
        });
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = listener.accept() => r,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let st = Arc::clone(&st);
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(answer(&st, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        MockDify { state, addr }
    }

    /// The base URL to give the gateway (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the reply for a run id (case-insensitive, as PostgreSQL compares UUIDs).
    pub fn set(&self, run_id: &str, reply: Reply) {
        self.set_sequence(run_id, vec![reply]);
    }

    /// Sets replies given in turn, one per request; the last one then repeats.
    pub fn set_sequence(&self, run_id: &str, replies: Vec<Reply>) {
        lock(&self.state.replies).insert(run_id.to_ascii_lowercase(), replies.into());
    }

    /// Accepts exactly these keys from now on (a key rotation: both, then only the new one).
    pub fn set_keys(&self, keys: &[&str]) {
        *lock(&self.state.keys) = keys.iter().map(|k| (*k).to_owned()).collect();
    }

    /// Delays every answer by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests received in all.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Requests received for the run-detail path of `run_id` (exact path text).
    pub fn hits(&self, run_id: &str) -> u64 {
        let path = format!("/v1/workflows/run/{run_id}");
        lock(&self.state.per_path).get(&path).copied().unwrap_or(0)
    }

    /// Stops the mock: the listener closes and open connections are cut, as when Dify goes
    /// down.
    pub fn stop(&self) {
        if let Some(tx) = &self.state.stop {
            let _ = tx.send(true);
        }
    }

    /// Headers of the last request received.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        lock(&self.state.last_headers).clone()
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn reply_response(r: Reply) -> Response<Body> {
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
        Reply::Hang => unreachable!("handled before"),
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

async fn answer(st: &State, req: Request<Incoming>) -> Response<Body> {
    st.total.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    *lock(&st.per_path).entry(path.clone()).or_default() += 1;
    *lock(&st.last_headers) = Some(req.headers().clone());
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|k| lock(&st.keys).iter().any(|key| key == k)) {
        let mut r = reply_response(Reply::dify_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Access token is invalid",
        ));
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"api\""),
        );
        return r;
    }

    if path == "/v1/parameters" || path == "/v1/info" {
        return reply_response(Reply::ok_json(
            "{\"name\": \"mock workflow\", \"description\": \"\", \"tags\": [], \"mode\": \"workflow\"}\n",
        ));
    }
    let Some(id) = path.strip_prefix("/v1/workflows/run/") else {
        return reply_response(Reply::dify_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "The requested URL was not found on the server.",
        ));
    };
    // Dify on PostgreSQL: a non-UUID id is a database error, answered 500.
    let Ok(uuid) = Uuid::try_parse(id) else {
        return reply_response(Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}\n",
        ));
    };
    let canon = uuid.hyphenated().to_string();
    let reply = lock(&st.replies).get_mut(&canon).and_then(|q| {
        if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().cloned()
        }
    });
    let reply = match (reply, st.auto) {
        (Some(r), _) => r,
        (None, Some(_)) if canon.starts_with(UNKNOWN_RUN_PREFIX) => Reply::dify_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Workflow run not found.",
        ),
        (None, Some(auto)) => {
            let first = *lock(&st.first_seen)
                .entry(canon.clone())
                .or_insert_with(Instant::now);
            let status = if first.elapsed() < auto.running_for {
                "\"running\""
            } else {
                auto_final_status(&uuid)
            };
            Reply::run_sized(&canon, status, auto.output_bytes)
        }
        (None, None) => Reply::dify_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Workflow run not found.",
        ),
    };
    if let Reply::Hang = reply {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut r = reply_response(reply);
    if r.status() == StatusCode::TOO_MANY_REQUESTS && !r.headers().contains_key(RETRY_AFTER) {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

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
