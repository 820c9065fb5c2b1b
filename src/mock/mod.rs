//! A mock Dify for local trials, tests and benchmarks: the Workflow App API with Dify's real
//! bodies, event streams, error shapes and status values, plus injectable faults and knobs to
//! hold, slow, stop and inspect what it does.
//!
//! Invariant: this is a fake Dify, not part of the gateway: it uses nothing from the rest of the
//! crate, only its own code and crates. It answers exactly what it was told (per run id, per
//! path, or by its run script), checks the app key on every route, and records every request
//! it receives, so tests can assert what reached the upstream.
//!
//! Routes (under `/v1`, parsed in `route`): run detail (`detail`); run starts, stop, event
//! resume and logs (`workflow`, with runs in `runs`, frames in `events`, streams in `stream`);
//! files and audio (`files`); the app's descriptions, end users, speech and human-input forms
//! (`app`). Bodies are written as Python's `json.dumps` writes them (`json`); canned replies
//! and Dify's error shape are in `reply`, the request log in `record`.

mod app;
mod detail;
mod events;
mod files;
mod json;
mod play;
mod record;
mod reply;
mod route;
mod runs;
mod stream;
mod workflow;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub use detail::{AutoRuns, UNKNOWN_RUN_PREFIX};
pub use files::DEFAULT_UPLOAD_LIMIT;
pub use record::{Recorded, UploadRecord, RECORDED_MAX};
pub use reply::{auto_final_status, now_epoch, run_body, Reply};
pub use runs::{RunEnd, RunInfo, RunScript};
pub use stream::{StreamEnd, StreamKind, StreamRecord};

use route::Route;

/// Every answer's body.
type Body = BoxBody<Bytes, std::io::Error>;

/// A route's answer; `Err` is Dify's refusal, answered as is.
type Answer = Result<Response<Body>, reply::Refusal>;

/// The largest JSON body the mock reads (Dify's nginx allows 100 MB; nothing sent to a JSON route
/// comes near).
const JSON_BODY_MAX: usize = 16 * 1024 * 1024;

/// Everything the mock knows and every knob a test turns.
struct State {
    /// Keys accepted (a rotation accepts old and new for a while, then only the new).
    keys: Mutex<Vec<String>>,
    /// Delay before every answer, in milliseconds.
    delay_ms: AtomicU64,
    /// Requests received in all.
    total: AtomicU64,
    /// Requests received per path (exact text).
    per_path: Mutex<HashMap<String, u64>>,
    /// Replies to give, in turn, to the next requests for a path, ahead of its route.
    injected: Mutex<HashMap<String, VecDeque<Reply>>>,
    /// The request log.
    record: record::Log,
    /// Run-detail replies set by tests, and auto mode.
    detail: detail::Details,
    /// Runs started through the API, and the knobs that drive them.
    runs: runs::Runs,
    /// Event streams served, and how each ended.
    streams: stream::Streams,
    /// Files received and stored.
    files: files::Files,
    /// End users met in `user` fields.
    users: app::EndUsers,
    /// Set to true to stop accepting and cut every open connection.
    stop: tokio::sync::watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running mock Dify; cheap to clone, stops when the runtime stops.
#[derive(Clone)]
pub struct MockDify {
    state: Arc<State>,
    addr: SocketAddr,
}

impl MockDify {
    /// Starts on `127.0.0.1:0` expecting `key`; run details must be set with [`MockDify::set`]
    /// (runs started through the API are known by themselves).
    pub async fn start(key: &str) -> std::io::Result<MockDify> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(l, key, None))
    }

    /// Starts on `listener`, in auto mode when `auto` is given.
    pub fn serve(listener: TcpListener, key: &str, auto: Option<AutoRuns>) -> MockDify {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(State {
            keys: Mutex::new(vec![key.to_owned()]),
            delay_ms: AtomicU64::new(0),
            total: AtomicU64::new(0),
            per_path: Mutex::default(),
            injected: Mutex::default(),
            record: record::Log::default(),
            detail: detail::Details::new(auto),
            runs: runs::Runs::default(),
            streams: stream::Streams::default(),
            files: files::Files::default(),
            users: app::EndUsers::default(),
            stop: stop_tx,
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
                // As Dify's servers do: an event goes out when written, not after the client's
                // delayed ACK of the one before.
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&st);
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(answer(st, req).await) }
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

    /// Accepts exactly these keys from now on (a key rotation: both, then only the new one).
    pub fn set_keys(&self, keys: &[&str]) {
        *lock(&self.state.keys) = keys.iter().map(|k| (*k).to_owned()).collect();
    }

    /// Delays every answer by `d` (before the key is checked).
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next requests for `path` (exact path text, any method) get these replies in turn,
    /// after the key check; then the route answers as usual again.
    pub fn fail_next(&self, path: &str, replies: Vec<Reply>) {
        lock(&self.state.injected).insert(path.to_owned(), replies.into());
    }

    /// Requests received in all.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Requests received for the run-detail path of `run_id` (exact path text).
    pub fn hits(&self, run_id: &str) -> u64 {
        self.path_hits(&format!("/v1/workflows/run/{run_id}"))
    }

    /// Requests received for `path` (exact path text, any method, any answer).
    pub fn path_hits(&self, path: &str) -> u64 {
        lock(&self.state.per_path).get(path).copied().unwrap_or(0)
    }

    /// Stops the mock: the listener closes and open connections are cut, as when Dify goes
    /// down.
    pub fn stop(&self) {
        let _ = self.state.stop.send(true);
    }

    /// Headers of the last request received.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.last_request().map(|r| r.headers)
    }
}

/// A request past the key check, its JSON body (if it has one) read.
struct Call {
    method: Method,
    headers: HeaderMap,
    query: Option<String>,
    /// The exact bytes of a JSON body.
    json: Option<Bytes>,
    /// Any other body, unread.
    body: Incoming,
}

impl Call {
    /// The JSON body as an object, or Dify's answer for a body that is not one.
    fn object(&self) -> Result<serde_json::Map<String, serde_json::Value>, reply::Refusal> {
        let Some(bytes) = &self.json else {
            return Err(reply::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Did not attempt to load JSON data because the request Content-Type was not 'application/json'.",
            ));
        };
        match serde_json::from_slice(bytes) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(reply::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "The browser (or proxy) sent a request that this server could not understand.",
            )),
        }
    }

    /// A query parameter, decoded.
    fn param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// The required `user` of a JSON body, or Dify's 400.
fn required_user(
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, reply::Refusal> {
    match body.get("user").and_then(|u| u.as_str()) {
        Some(u) if !u.is_empty() => Ok(u.to_owned()),
        _ => Err(reply::invalid_param("Arg user must be provided.")),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| t == "application/json" || t.ends_with("+json"))
}

fn authorized(st: &State, headers: &HeaderMap) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|k| lock(&st.keys).iter().any(|key| key == k))
}

async fn answer(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    st.total.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    *lock(&st.per_path).entry(path.clone()).or_default() += 1;
    let seq = st.record.head(&req);
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    if !authorized(&st, req.headers()) {
        let mut r = reply::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Access token is invalid",
        )
        .answer();
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"api\""),
        );
        return r;
    }
    match dispatch(&st, &path, seq, req).await {
        Ok(r) => r,
        Err(refused) => refused.answer(),
    }
}

/// Reads a JSON body, then answers with an injected reply or the route.
async fn dispatch(st: &Arc<State>, path: &str, seq: u64, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let mut call = Call {
        method: parts.method,
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        json: None,
        body,
    };
    if is_json(&call.headers) {
        let read = Limited::new(&mut call.body, JSON_BODY_MAX).collect().await;
        let b = match read {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(reply::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    "The request body is too large.",
                ));
            }
            Err(_) => return Err(reply::invalid_param("The request body could not be read.")),
        };
        st.record.body(seq, b.clone());
        call.json = Some(b);
    }

    let injected = lock(&st.injected)
        .get_mut(path)
        .and_then(VecDeque::pop_front);
    if let Some(r) = injected {
        return Ok(reply::respond(r).await);
    }

    let route = Route::parse(path);
    if !route.allows(&call.method) {
        return Err(reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "The method is not allowed for the requested URL.",
        ));
    }
    match route {
        Route::RunDetail(id) => Ok(detail::answer(st, id).await),
        Route::RunStart(workflow) => workflow::start(st, workflow, call).await,
        Route::Stop(task) => workflow::stop(st, task, &call),
        Route::Events(run) => workflow::events(st, run, &call),
        Route::Logs => workflow::logs(st, &call),
        Route::Upload => files::upload(st, path, call).await,
        Route::Preview(file) => files::preview(st, file, &call),
        Route::AudioToText => files::audio_to_text(st, path, call).await,
        Route::AppMeta(which) => Ok(app::meta(which)),
        Route::EndUser(id) => app::end_user(st, id),
        Route::TextToAudio => app::text_to_audio(st, &call),
        Route::HumanInput(_) => app::human_input(st, &call),
        Route::Unknown => Err(reply::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "The requested URL was not found on the server.",
        )),
    }
}
