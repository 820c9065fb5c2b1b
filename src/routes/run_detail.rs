//! `GET /v1/workflows/run/{id}`: a run's detail, from the cache when it holds a fresh answer,
//! else from the one fetch for it ([`crate::cache::fetch`]), else — when that refresh fails — the
//! last answer kept for stale-if-error.
//!
//! Invariant: a client the ownership records call foreign to the run (see [`crate::ownership`])
//! gets Dify's 404 for an unknown run, decided before the cache is looked at, so no cached
//! answer reaches it and no upstream request is made for it. Every answer carries `X-Cache` with
//! its [`CacheOutcome`], and `Age` when it comes
//! from the cache; an upstream answer is served with its status, its kept headers and its body
//! bytes as received. Every answer made from an upstream answer carries its strong `ETag` and a
//! `Cache-Control` that tells the truth (immutable once terminal, revalidate otherwise); a 2xx
//! whose ETag the client's `If-None-Match` names becomes a 304 with no body.

use std::sync::Arc;
use std::time::Duration;

use http::header::{
    HeaderName, HeaderValue, AGE, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH, RETRY_AFTER,
    WARNING,
};
use http::{HeaderMap, Response, StatusCode};

use crate::body::Body;
use crate::cache::fetch::{Fetch, Fetched, FlightValue};
use crate::cache::{Cache, CacheKey, KeptHeaders, Stored};
use crate::clients::Client;
use crate::error::GatewayError;
use crate::flight::Role;
use crate::metrics::Metrics;
use crate::outcome::CacheOutcome;
use crate::ownership::{Access, Kind, Ownership};
use crate::policy::EntryClass;
use crate::run_id::RunId;
use crate::upstream::{App, X_ENV, X_VERSION};
use crate::watch::{is_running, Full, Watchers};

use super::wait;

/// `X-Cache` response header.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// What serving a run came to, for the access log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub cache: CacheOutcome,
    /// The `code` of the gateway's own error answer, when it gave one.
    pub error: Option<&'static str>,
    /// Upstream status, when the answer came from a fetch that got one.
    pub upstream_status: Option<StatusCode>,
    /// Time of the upstream exchange, when this request started the fetch.
    pub upstream_elapsed: Option<Duration>,
    /// What the ownership records said about the client and the run.
    pub access: Access,
}

impl Served {
    fn by(cache: CacheOutcome) -> Served {
        Served {
            cache,
            error: None,
            upstream_status: None,
            upstream_elapsed: None,
            access: Access::NotIsolated,
        }
    }
}

/// The run-detail route's state: who may read which run, the cache it reads, the fetch that
/// fills it, and the watchers of running runs for the requests that wait.
pub struct RunDetail {
    ownership: Arc<Ownership>,
    cache: Cache,
    fetch: Arc<Fetch>,
    metrics: Arc<Metrics>,
    watchers: Arc<Watchers>,
    /// `longpoll.max_wait`.
    max_wait: Duration,
}

impl RunDetail {
    pub fn new(
        ownership: Arc<Ownership>,
        cache: Cache,
        fetch: Arc<Fetch>,
        metrics: Arc<Metrics>,
        watchers: Arc<Watchers>,
        max_wait: Duration,
    ) -> RunDetail {
        RunDetail {
            ownership,
            cache,
            fetch,
            metrics,
            watchers,
            max_wait,
        }
    }

    /// The watchers of running runs (for the status stream and shutdown).
    pub fn watchers(&self) -> &Arc<Watchers> {
        &self.watchers
    }

    /// The answer to a request a fresh cached entry serves as it is, made without waiting on
    /// anything: the client may read the run by this replica's memory alone, and the request
    /// asks for no wait. `None` sends the request down [`RunDetail::serve_request`], which
    /// answers the same for such a request: this only spares a hit building the futures of the
    /// paths that can wait.
    pub fn try_hit(
        &self,
        app: &App,
        run: RunId,
        client: Option<&Arc<Client>>,
        req: &HeaderMap,
    ) -> Option<(Response<Body>, Served)> {
        let access =
            self.ownership
                .check_now(app.id, Kind::Run, run.uuid(), client.map(|c| &*c.name))?;
        if !access.allowed() || wait::preferred_wait(req).is_some() {
            return None;
        }
        let found = self.cache.lookup(&CacheKey { app: app.id, run })?;
        if !found.fresh {
            return None;
        }
        let served = Served {
            access,
            ..Served::by(CacheOutcome::Hit)
        };
        Some((
            conditional(answer(found.stored, CacheOutcome::Hit), req),
            served,
        ))
    }

    /// [`RunDetail::serve`], then the conditional answer; with `Prefer: wait=N` on a running
    /// run whose body the client's `If-None-Match` (if any) still names, held until it changes
    /// (see [`super::wait`]).
    pub async fn serve_request(
        &self,
        app: &Arc<App>,
        run: RunId,
        rid: &HeaderValue,
        client: Option<&Arc<Client>>,
        req: &HeaderMap,
    ) -> (Response<Body>, Served) {
        let (resp, served) = self.serve(app, run, rid, client).await;
        let Some(asked) = wait::preferred_wait(req) else {
            return (conditional(resp, req), served);
        };
        let applied = asked.min(self.max_wait);
        let inm = req.contains_key(IF_NONE_MATCH);
        // Not yet there: still running and, with If-None-Match, still the body the client has.
        let waiting = |s: &Stored| is_running(s) && (!inm || none_match_fails(req, &s.etag));
        let current = match resp.body() {
            Body::Entry(s) if served.cache != CacheOutcome::Stale && waiting(s) => Arc::clone(s),
            _ => return (conditional(resp, req), served),
        };
        if applied.is_zero() || self.watchers.stopping() {
            return (conditional(resp, req), served);
        }
        let key = CacheKey { app: app.id, run };
        let mut waiter = match self.watchers.join(app, key, current, client) {
            Ok(w) => w,
            Err(full) => {
                let e = match full {
                    Full::Gateway => GatewayError::Overloaded,
                    Full::Client => GatewayError::RateLimited {
                        retry_after_secs: 1,
                    },
                };
                let served = Served {
                    error: Some(e.as_str()),
                    ..served
                };
                return (error(&e, served.cache), served);
            }
        };
        let deadline = tokio::time::Instant::now() + applied;
        let now = waiter.until(deadline, |s| !waiting(s)).await;
        drop(waiter);
        let mut resp = conditional(answer(now, CacheOutcome::Hit), req);
        resp.headers_mut()
            .insert(wait::PREFERENCE_APPLIED.clone(), wait::applied(applied));
        (
            resp,
            Served {
                cache: CacheOutcome::Hit,
                ..served
            },
        )
    }

    /// The cache this route reads (for operations).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The fetches behind its misses (for operations).
    pub fn fetch(&self) -> &Fetch {
        &self.fetch
    }

    /// Answers a request for `run` of `app`; a fetch it starts is charged to `client`.
    pub async fn serve(
        &self,
        app: &Arc<App>,
        run: RunId,
        rid: &HeaderValue,
        client: Option<&Arc<Client>>,
    ) -> (Response<Body>, Served) {
        let access = self
            .ownership
            .check(app.id, Kind::Run, run.uuid(), client.map(|c| &*c.name))
            .await;
        if !access.allowed() {
            // As an unknown run reads through the gateway: Dify's 404, `X-Cache: miss`.
            let e = GatewayError::RunNotFound;
            let served = Served {
                error: Some(e.as_str()),
                access,
                ..Served::by(CacheOutcome::Miss)
            };
            return (error(&e, CacheOutcome::Miss), served);
        }
        let (resp, served) = self.serve_allowed(app, run, rid, client).await;
        (resp, Served { access, ..served })
    }

    /// [`RunDetail::serve`] once the client may read the run.
    async fn serve_allowed(
        &self,
        app: &Arc<App>,
        run: RunId,
        rid: &HeaderValue,
        client: Option<&Arc<Client>>,
    ) -> (Response<Body>, Served) {
        let key = CacheKey { app: app.id, run };
        let stale = match self.cache.lookup(&key) {
            Some(found) if found.fresh => {
                return (
                    answer(found.stored, CacheOutcome::Hit),
                    Served::by(CacheOutcome::Hit),
                )
            }
            Some(found) => Some(found.stored),
            None => None,
        };
        let (fetched, role) = match self.fetch.run(app, run, rid, client).await {
            Ok((FlightValue::Fetched(f), role)) => (f, role),
            Ok((FlightValue::Cached(hit), _)) => {
                return (
                    answer(hit, CacheOutcome::Hit),
                    Served::by(CacheOutcome::Hit),
                )
            }
            Err(_) => {
                let e = GatewayError::Internal;
                let served = Served {
                    error: Some(e.as_str()),
                    ..Served::by(CacheOutcome::Miss)
                };
                return (error(&e, CacheOutcome::Miss), served);
            }
        };
        let outcome = match role {
            Role::Leader => CacheOutcome::Miss,
            Role::Follower | Role::Rechecked => CacheOutcome::Coalesced,
        };
        let mut served = Served {
            cache: outcome,
            error: None,
            upstream_status: fetched.upstream_status,
            upstream_elapsed: (role == Role::Leader).then_some(fetched.upstream_elapsed),
            access: Access::NotIsolated,
        };
        if let Some(old) = stale.filter(|_| refresh_failed(&fetched)) {
            served.cache = CacheOutcome::Stale;
            self.metrics.stale_served.inc();
            let mut resp = answer(old, CacheOutcome::Stale);
            resp.headers_mut().insert(
                WARNING,
                HeaderValue::from_static("111 dify-gateway \"Revalidation Failed\""),
            );
            return (resp, served);
        }
        let resp = match &fetched.result {
            Ok(stored) => answer(Arc::clone(stored), outcome),
            Err(e) => {
                served.error = Some(e.as_str());
                error(e, outcome)
            }
        };
        (resp, served)
    }
}

/// Did a refresh fail in a way that makes a stale answer better than the failure? Transport
/// errors, the gateway's own refusals (overload, circuit open), 429 and 5xx do; an answer the
/// upstream gave deliberately (200, 404, 401, 403) does not.
fn refresh_failed(f: &Fetched) -> bool {
    match &f.result {
        Ok(s) => s.status == StatusCode::TOO_MANY_REQUESTS || s.status.is_server_error(),
        Err(_) => true,
    }
}

/// `Cache-Control` of a terminal answer: it never changes.
static IMMUTABLE: HeaderValue = HeaderValue::from_static("private, max-age=31536000, immutable");
/// `Cache-Control` of any other answer: it may change, so it is revalidated before reuse.
static NO_CACHE: HeaderValue = HeaderValue::from_static("private, no-cache");

/// Turns a 2xx answer made from an entry into a 304 with no body when `req`'s `If-None-Match`
/// names the entry's ETag; anything else is returned as it is.
pub fn conditional(mut resp: Response<Body>, req: &HeaderMap) -> Response<Body> {
    let Body::Entry(s) = resp.body() else {
        return resp;
    };
    if !s.status.is_success() || !none_match_fails(req, &s.etag) {
        return resp;
    }
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    *resp.body_mut() = Body::empty();
    resp
}

/// Does `req`'s `If-None-Match` name `etag` (or say `*`)? Weak comparison (RFC 9110 §13.1.2):
/// `W/"x"` names `"x"`. Every header line counts; a malformed one names nothing.
pub fn none_match_fails(req: &HeaderMap, etag: &HeaderValue) -> bool {
    let tag = opaque(etag.as_bytes());
    req.get_all(IF_NONE_MATCH).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| t == b"*" || opaque(t) == tag)
    })
}

/// The opaque part of an entity tag, its `W/` dropped.
fn opaque(t: &[u8]) -> &[u8] {
    t.strip_prefix(b"W/").unwrap_or(t)
}

/// Builds the client's response from a stored answer: the bytes as received (lent by the
/// entry), the kept headers, `ETag`, `Cache-Control`, `X-Cache`, and `Age` when served from the
/// cache.
pub fn answer(s: Arc<Stored>, outcome: CacheOutcome) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = s.status;
    let h = resp.headers_mut();
    h.reserve(8);
    let KeptHeaders {
        content_type,
        x_version,
        x_env,
        retry_after,
    } = &*s.headers;
    if let Some(v) = content_type {
        h.insert(CONTENT_TYPE, v.clone());
    }
    if let Some(v) = x_version {
        h.insert(X_VERSION.clone(), v.clone());
    }
    if let Some(v) = x_env {
        h.insert(X_ENV.clone(), v.clone());
    }
    if let Some(v) = retry_after {
        h.insert(RETRY_AFTER, v.clone());
    }
    h.insert(ETAG, s.etag.clone());
    let cc = if s.class == Some(EntryClass::Terminal) {
        &IMMUTABLE
    } else {
        &NO_CACHE
    };
    h.insert(CACHE_CONTROL, cc.clone());
    h.insert(X_CACHE.clone(), outcome.header());
    if matches!(outcome, CacheOutcome::Hit | CacheOutcome::Stale) {
        h.insert(AGE, age_header(s.fetched_at.elapsed().as_secs()));
    }
    // The entry itself becomes the body: its bytes are lent when the body is sent.
    *resp.body_mut() = Body::Entry(s);
    resp
}

/// The gateway's own error answer, with `X-Cache`.
fn error(e: &GatewayError, outcome: CacheOutcome) -> Response<Body> {
    let mut resp = e.to_response().map(Body::Full);
    resp.headers_mut().insert(X_CACHE.clone(), outcome.header());
    resp
}

/// `Age` values for the first minute, so most hits build the header without allocating.
static SMALL_AGES: [&str; 60] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32",
    "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46", "47", "48",
    "49", "50", "51", "52", "53", "54", "55", "56", "57", "58", "59",
];

fn age_header(secs: u64) -> HeaderValue {
    match SMALL_AGES.get(secs as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(secs),
    }
}
