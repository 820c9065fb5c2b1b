//! Passing a request through to the client's app: the Workflow App API beyond the cached run
//! detail (run starts and their streams, stops, logs, files, the app's descriptions).
//!
//! Invariant: a passed-through request reaches only its client's app, with that app's key; the
//! upstream sees only the forwarded headers ([`headers::FORWARDED`] and the request id), the
//! path as routed, the query and the body — with the client's `user` prefixed where it has a
//! `user_prefix` and nothing else changed. Bodies stream both ways; only a JSON request body
//! (capped) and a blocking run answer's first `upstream.max_body_bytes` (to read its status) are
//! held. A run's answer is followed to its end even when its client has left ([`pump`]).
//!
//! A run start with `"response_mode": "async"` is sent upstream as `streaming` and answered
//! `202 Accepted` with the run's ids and `Location` once `workflow_started` arrives (or with
//! Dify's error, when an `error` event comes first); the stream is then followed with no client,
//! holding the client's open-stream place until the run ends. A run start with an
//! `Idempotency-Key` is claimed before it is sent and settled by what its answer shows (see
//! [`crate::idempotency`]).
//!
//! Retries: none. A run start is not idempotent, and a streamed body cannot be sent twice; once
//! a request may have reached the upstream the client decides. A connect failure is answered
//! 502 `upstream_unavailable` and counts towards the app's circuit breaker like any other.

pub mod headers;
pub mod meta;
pub mod pump;
pub mod request;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Body as HttpBody;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::body::{Body, BodyError};
use crate::cache::fetch::Fetch;
use crate::config::Config;
use crate::error::{dify_error_body, GatewayError};
use crate::idempotency::{Answer, Begin, Claimed, Idempotency};
use crate::metrics::{Metrics, RejectReason};
use crate::outcome::UpstreamOutcome;
use crate::ownership::{Kind, Ownership};
use crate::rewrite::{json, UserPrefix};
use crate::starts::{StartRefused, StreamPermit};
use crate::upstream::{App, UpstreamError, X_REQUEST_ID};
use crate::usage::Usage;
use crate::webhooks::Webhooks;

pub use request::{BodyKind, Mode};

/// Most bytes of an upload's answer (a file's description) read to learn the file's id.
const MAX_UPLOAD_ANSWER: usize = 64 * 1024;

/// `X-Accel-Buffering: no`, so an nginx in front does not hold events back.
pub static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Why a passed-through request was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("request body too large")]
    TooLarge,
    #[error("the request body is not valid JSON")]
    NotJson,
    #[error("user must be a string")]
    UserNotString,
    #[error("the request body is not valid multipart/form-data")]
    BadMultipart,
    #[error("request body is incomplete")]
    Broken,
    #[error("request body was not received in time")]
    TooSlow,
    #[error("upstream failed")]
    Upstream(UpstreamError),
    #[error("run start refused")]
    Start(StartRefused),
    #[error("the Idempotency-Key is in use")]
    KeyInUse,
    #[error("the Idempotency-Key was used with another request")]
    KeyMismatch,
}

impl Refusal {
    /// The metric label of a refusal at the door; `None` for an upstream failure.
    pub fn reason(self) -> Option<RejectReason> {
        Some(match self {
            Refusal::TooLarge => RejectReason::BodyTooLarge,
            Refusal::NotJson | Refusal::UserNotString | Refusal::BadMultipart => {
                RejectReason::BadBody
            }
            Refusal::Broken => RejectReason::BadFraming,
            Refusal::TooSlow => RejectReason::BodyTimeout,
            Refusal::Start(r) => r.reason(),
            Refusal::KeyInUse | Refusal::KeyMismatch => RejectReason::Idempotency,
            Refusal::Upstream(_) => return None,
        })
    }
}

impl From<Refusal> for GatewayError {
    fn from(r: Refusal) -> GatewayError {
        match r {
            Refusal::TooLarge => GatewayError::RequestTooLarge,
            Refusal::NotJson => GatewayError::InvalidParam("the request body is not valid JSON"),
            Refusal::UserNotString => GatewayError::InvalidParam("user must be a string"),
            Refusal::BadMultipart => GatewayError::InvalidParam(
                "the request body must be multipart/form-data with a boundary",
            ),
            Refusal::Broken => GatewayError::BadFraming,
            Refusal::TooSlow => GatewayError::RequestTimeout,
            Refusal::Upstream(e) => e.into(),
            Refusal::Start(r) => r.into(),
            Refusal::KeyInUse => GatewayError::IdempotencyKeyInUse,
            Refusal::KeyMismatch => GatewayError::IdempotencyKeyMismatch,
        }
    }
}

/// The run answers this gateway follows upstream (with or without their client), so a drain
/// can wait for them: Dify may interrupt a run whose stream reader goes away.
#[derive(Debug, Default)]
pub struct Followed {
    count: AtomicUsize,
    idle: Notify,
}

/// One followed answer; dropped when its pump ends.
struct Following(Arc<Followed>);

impl Drop for Following {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Followed {
    fn enter(self: &Arc<Self>) -> Following {
        self.count.fetch_add(1, Ordering::AcqRel);
        Following(Arc::clone(self))
    }

    /// Answers followed now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// True when none is followed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns once no answer is followed.
    pub async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.is_empty() {
                return;
            }
            idle.await;
        }
    }
}

/// One request to pass: where it goes and how its body and answer are handled.
pub struct Forward<'a> {
    /// The client's app.
    pub app: &'a Arc<App>,
    /// Path and query relative to the app's base URL (starting with `/`), prefix applied.
    pub path_and_query: String,
    pub body: BodyKind,
    /// The answer follows a run (a run start, an event resume): followed to its end, bounded
    /// by `upstream.run_timeout`, its finish drops the run's kept `running` answer.
    pub follows_run: bool,
    /// The client's end-user prefix.
    pub prefix: Option<&'a UserPrefix>,
    /// The client, recorded as the owner of the run or file this request creates; `None` in
    /// open mode or when the request creates nothing.
    pub owner: Option<Arc<str>>,
    /// A run start's admission: given whether it streams, the client's start limits take it
    /// (and, for a stream, one of its open-stream places) or refuse it.
    pub admit: Option<&'a (dyn Fn(bool) -> Result<StreamPermit, StartRefused> + Sync)>,
    /// A place among the client's open streams, taken at the door (a resumed stream).
    pub permit: Option<StreamPermit>,
    /// The client a finished run's figures are counted to.
    pub counted_to: Arc<str>,
    /// The answer names a file the client uploaded: it is read to record the file's owner.
    pub records_file: bool,
    /// A run start's `Idempotency-Key`, with whose it is.
    pub idempotent: Option<Idempotent<'a>>,
}

/// A run start's `Idempotency-Key` (checked) and the client it belongs to.
pub struct Idempotent<'a> {
    pub store: &'a Arc<Idempotency>,
    /// The client's name ([`crate::usage::OPEN_CLIENT`] in open mode).
    pub client: &'a str,
    pub key: &'a str,
}

/// What the access log and metrics learn about a passed-through request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub upstream_status: Option<StatusCode>,
    pub upstream_elapsed: Option<Duration>,
}

/// The passed-through routes' settings and what they touch.
pub struct Passthrough {
    max_json_bytes: u64,
    max_upload_bytes: u64,
    /// Time a JSON body may take to arrive: `server.header_read_timeout`.
    body_read_timeout: Duration,
    /// Head of a non-run answer: `upstream.total_timeout`.
    total_timeout: Duration,
    run_timeout: Duration,
    heartbeat: Duration,
    idle_timeout: Duration,
    max_answer_bytes: usize,
    /// The run-detail fetches, whose kept `running` answers a seen finish drops.
    fetch: Arc<Fetch>,
    /// Who created which run, task and file.
    ownership: Arc<Ownership>,
    /// Where finished runs are counted.
    usage: Arc<Usage>,
    /// The app descriptions kept for `cache.app_meta_ttl`.
    meta: meta::MetaCache,
    metrics: Arc<Metrics>,
    /// Run answers followed now.
    followed: Arc<Followed>,
    /// Where a started run's end is announced.
    webhooks: Arc<Webhooks>,
}

/// Dify's in-stream `error` event (`{"event":"error","status","code","message"}`) as the
/// error answer it stands for; a status outside 400–599 reads as 500.
fn stream_error(raw: &[u8]) -> Response<Body> {
    #[derive(serde::Deserialize, Default)]
    struct Error {
        status: Option<u16>,
        code: Option<String>,
        message: Option<String>,
    }
    let e: Error = serde_json::from_slice(raw).unwrap_or_default();
    let status = e
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = e.code.as_deref().unwrap_or("internal_server_error");
    let message = e.message.as_deref().unwrap_or("the run failed to start");
    let mut out = Response::new(Body::Full(dify_error_body(code, message, status)));
    *out.status_mut() = status;
    out.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out
}

impl Passthrough {
    pub fn new(
        config: &Config,
        fetch: Arc<Fetch>,
        ownership: Arc<Ownership>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
        webhooks: Arc<Webhooks>,
    ) -> Passthrough {
        Passthrough {
            max_json_bytes: config.passthrough.max_json_bytes,
            max_upload_bytes: config.passthrough.max_upload_bytes,
            body_read_timeout: config.server.header_read_timeout,
            total_timeout: config.upstream.total_timeout,
            run_timeout: config.upstream.run_timeout,
            heartbeat: config.stream.heartbeat,
            idle_timeout: config.stream.idle_timeout,
            max_answer_bytes: config.upstream.max_body_bytes,
            fetch,
            ownership,
            usage,
            meta: meta::MetaCache::new(config.cache.app_meta_ttl),
            metrics,
            followed: Arc::default(),
            webhooks,
        }
    }

    /// The run answers followed now (each to its end, whether or not its client stayed).
    pub fn followed(&self) -> &Arc<Followed> {
        &self.followed
    }

    /// The app descriptions kept per app.
    pub fn meta(&self) -> &meta::MetaCache {
        &self.meta
    }

    /// Most bytes of an upstream answer the gateway reads whole.
    pub fn max_answer_bytes(&self) -> usize {
        self.max_answer_bytes
    }

    /// Passes one request; `Err` is answered by the gateway in Dify's error shape.
    pub async fn serve<B>(
        &self,
        mut fwd: Forward<'_>,
        req: &Parts,
        body: B,
        rid: &HeaderValue,
        served: &mut Served,
    ) -> Result<Response<Body>, Refusal>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        let start = Instant::now();
        let fault = request::Fault::default();
        let mut mode = Mode::Blocking;
        let mut claim = None;
        let content_type = req
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let pass_body = match fwd.body {
            BodyKind::None => request::empty(),
            BodyKind::Json => {
                let json = request::json_bytes(
                    body,
                    self.max_json_bytes,
                    self.body_read_timeout,
                    fwd.prefix,
                )
                .await?;
                if let Some(admit) = fwd.admit {
                    mode = Mode::of(&json);
                    if let Some(i) = &fwd.idempotent {
                        let request = [
                            req.method.as_str().as_bytes(),
                            fwd.path_and_query.as_bytes(),
                            &json[..],
                        ];
                        match i
                            .store
                            .begin(i.client, &fwd.app.name, i.key, &request)
                            .await
                        {
                            Begin::Fresh(c) => claim = Some(c),
                            Begin::Replay(answer) => return Ok(answer.replay()),
                            Begin::InFlight => return Err(Refusal::KeyInUse),
                            Begin::Mismatch => return Err(Refusal::KeyMismatch),
                        }
                    }
                    // An async run holds a stream upstream for as long as it runs.
                    let permit = admit(mode != Mode::Blocking).map_err(Refusal::Start)?;
                    fwd.permit = Some(permit);
                }
                if mode == Mode::Async {
                    let streaming = json::set_string(&json, "response_mode", "streaming")
                        .map_err(|_| Refusal::NotJson)?;
                    request::full(Bytes::from(streaming.into_owned()))
                } else {
                    request::full(json)
                }
            }
            BodyKind::Multipart => {
                let rewriter = match fwd.prefix {
                    Some(p) => Some(request::rewriter(content_type, p)?),
                    None if content_type
                        .to_ascii_lowercase()
                        .starts_with("multipart/form-data") =>
                    {
                        None
                    }
                    None => return Err(Refusal::BadMultipart),
                };
                request::streamed(body, self.max_upload_bytes, rewriter, fault.clone())?
            }
            BodyKind::Raw => request::streamed(body, self.max_upload_bytes, None, fault.clone())?,
        };
        let mut up = Request::new(pass_body);
        *up.method_mut() = req.method.clone();
        *up.headers_mut() = headers::request(&req.headers);
        up.headers_mut().insert(X_REQUEST_ID.clone(), rid.clone());
        if let Some(len) = req.headers.get(CONTENT_LENGTH) {
            // Only an untouched streamed body keeps the client's length; hyper sets the others.
            if fwd.body == BodyKind::Raw
                || (fwd.body == BodyKind::Multipart && fwd.prefix.is_none())
            {
                up.headers_mut().insert(CONTENT_LENGTH, len.clone());
            }
        }

        fwd.app
            .breaker
            .admit()
            .map_err(|r| Refusal::Upstream(UpstreamError::CircuitOpen { retry_after: r.0 }))?;
        // A run start (or an upload) may take as long as the run; other heads come within the
        // total timeout.
        let head_bound =
            if fwd.follows_run || fwd.body != BodyKind::Json && fwd.body != BodyKind::None {
                self.run_timeout
            } else {
                self.total_timeout
            };
        let sent =
            tokio::time::timeout(head_bound, fwd.app.upstream.pass(up, &fwd.path_and_query)).await;
        let elapsed = start.elapsed();
        served.upstream_elapsed = Some(elapsed);
        let resp = match sent {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(r) => r,
        };
        // A refusal of the client's own body wins over what it did to the exchange.
        if let Some(why) = fault.get() {
            self.metrics
                .upstream(UpstreamOutcome::BadResponse, Some(elapsed));
            return Err(*why);
        }
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                fwd.app.breaker.record(e.is_failure());
                self.metrics.upstream(e.outcome(), Some(elapsed));
                return Err(Refusal::Upstream(e));
            }
        };
        let status = resp.status();
        fwd.app.breaker.record(status.is_server_error());
        self.metrics
            .upstream(UpstreamOutcome::from_status(status), Some(elapsed));
        served.upstream_status = Some(status);
        let (parts, incoming) = resp.into_parts();
        let mut out = Response::new(Body::empty());
        *out.status_mut() = status;
        *out.headers_mut() = headers::response(&parts.headers);
        if fwd.records_file && status.is_success() {
            if let Some(owner) = &fwd.owner {
                return self.record_file(fwd.app, owner, out, incoming).await;
            }
        }
        if !fwd.follows_run {
            *out.body_mut() = Body::Streamed(incoming);
            return Ok(out);
        }
        let events = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        let bounds = pump::Bounds {
            deadline: (start + self.run_timeout).into(),
            idle: self.idle_timeout,
            heartbeat: self.heartbeat,
            max_answer_bytes: self.max_answer_bytes,
        };
        let mut hooks = pump::Hooks {
            fetch: Arc::clone(&self.fetch),
            app: Arc::clone(fwd.app),
            ownership: Arc::clone(&self.ownership),
            owner: fwd.owner.clone(),
            usage: Arc::clone(&self.usage),
            counted_to: Arc::clone(&fwd.counted_to),
            on_start: None,
            claim: None,
            warm: false,
            head: (status, parts.headers.get(CONTENT_TYPE).cloned()),
            webhooks: Some(Arc::clone(&self.webhooks)),
            run: None,
        };
        if mode == Mode::Async && events && status.is_success() {
            return self
                .start_async(incoming, bounds, hooks, fwd.permit.take(), claim, rid)
                .await;
        }
        // A start that made no run frees its key (the claim is dropped).
        hooks.claim = claim.filter(|_| status.is_success());
        if events {
            let h = out.headers_mut();
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
            h.remove(CONTENT_LENGTH);
        }
        let (tx, rx) = mpsc::channel(pump::QUEUE);
        *out.body_mut() = match fwd.permit.take() {
            // The client's open-stream place goes when its answer does (it left, or it ended).
            Some(p) => Body::Guarded(Box::new(Body::Events(rx)), Box::new(p)),
            None => Body::Events(rx),
        };
        let rid = rid.clone();
        // NOTE for `server.max_response_time`: this answer (`Body::is_stream`) lasts as long as
        // the run; it is bounded by `upstream.run_timeout` and `stream.idle_timeout` here and
        // must be exempt from the connection's response-time bound.
        let following = self.followed.enter();
        tokio::spawn(async move {
            let _following = following;
            let (end, stayed) = pump::follow(incoming, Some(tx), events, bounds, hooks).await;
            tracing::debug!(request_id = ?rid, end = end.as_str(), client_stayed = stayed, "run answer followed");
        });
        Ok(out)
    }

    /// An async start: its stream is followed with no client (holding `permit`, the client's
    /// open-stream place, until it ends); the client is answered `202 Accepted` with the run's
    /// ids once `workflow_started` arrives, or Dify's error when an `error` event comes first.
    async fn start_async(
        &self,
        incoming: crate::upstream::UpstreamBody,
        bounds: pump::Bounds,
        mut hooks: pump::Hooks,
        permit: Option<StreamPermit>,
        claim: Option<Claimed>,
        rid: &HeaderValue,
    ) -> Result<Response<Body>, Refusal> {
        let (started_tx, started) = oneshot::channel();
        hooks.on_start = Some(started_tx);
        hooks.warm = true;
        let rid_log = rid.clone();
        let following = self.followed.enter();
        tokio::spawn(async move {
            let _following = following;
            let _place = permit;
            let (end, _) = pump::follow(incoming, None, true, bounds, hooks).await;
            tracing::debug!(request_id = ?rid_log, end = end.as_str(), "async run followed");
        });
        let start = match tokio::time::timeout(self.idle_timeout, started).await {
            Ok(Ok(s)) => s,
            // The stream ended, broke or stayed silent before the run started.
            Ok(Err(_)) => return Err(Refusal::Upstream(UpstreamError::Protocol)),
            Err(_) => return Err(Refusal::Upstream(UpstreamError::Timeout)),
        };
        let (run, task) = match start {
            pump::Start::Started { run, task } => (run, task),
            pump::Start::Failed(raw) => return Ok(stream_error(&raw)),
        };
        #[derive(serde::Serialize)]
        struct Accepted<'a> {
            task_id: &'a str,
            workflow_run_id: &'a str,
            status: &'static str,
        }
        let body = Bytes::from(
            serde_json::to_vec(&Accepted {
                task_id: &task,
                workflow_run_id: &run,
                status: "running",
            })
            .unwrap_or_default(),
        );
        let location = HeaderValue::try_from(format!("/v1/workflows/run/{run}"))
            .map_err(|_| Refusal::Upstream(UpstreamError::Protocol))?;
        let answer = Answer::Full {
            status: StatusCode::ACCEPTED,
            content_type: Some(HeaderValue::from_static("application/json")),
            location: Some(location),
            body,
        };
        let mut out = answer.replay();
        out.headers_mut()
            .remove(&crate::idempotency::IDEMPOTENT_REPLAYED);
        if let Some(c) = claim {
            c.made(answer).await;
        }
        Ok(out)
    }

    /// An upload's answer: read (it is a file's short description) to record the file as
    /// `owner`'s before the client learns its id, then passed on whole.
    async fn record_file(
        &self,
        app: &Arc<App>,
        owner: &str,
        mut out: Response<Body>,
        incoming: crate::upstream::UpstreamBody,
    ) -> Result<Response<Body>, Refusal> {
        #[derive(serde::Deserialize)]
        struct Uploaded {
            id: String,
        }
        let bytes = http_body_util::Limited::new(incoming, MAX_UPLOAD_ANSWER)
            .collect()
            .await
            .map_err(|_| Refusal::Upstream(UpstreamError::Protocol))?
            .to_bytes();
        if let Some(id) = serde_json::from_slice::<Uploaded>(&bytes)
            .ok()
            .and_then(|f| uuid::Uuid::try_parse(&f.id).ok())
        {
            self.ownership
                .record(app.id, Kind::File, id, Some(owner))
                .await;
        }
        *out.body_mut() = Body::Full(bytes);
        Ok(out)
    }
}
