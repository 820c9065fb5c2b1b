//! The request handler: routing, the cache lookup and the shared upstream fetch.
//!
//! Invariant: a run-detail request reaches the upstream only with a valid, canonical run id and
//! only when the cache has no live entry and no fetch for the same (app, run) is in flight; what
//! the fetch brings back is cached only as [`Policy::decide`] says, before waiters are woken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AGE, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::cache::{AppId, Cache, CacheKey, KeptHeaders, Stored};
use crate::config::Config;
use crate::error::GatewayError;
use crate::flight::{Role, SingleFlight};
use crate::outcome::{CacheOutcome, Route};
use crate::policy::{Decision, NoCacheReason, Policy};
use crate::run_id::RunId;
use crate::upstream::{Upstream, UpstreamSetupError, X_ENV, X_VERSION};

/// Path prefix of the run-detail route, as Dify serves it under `/v1`.
pub const RUN_DETAIL_PREFIX: &str = "/v1/workflows/run/";

/// `X-Cache` response header.
pub static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// The result of one shared upstream fetch, as every waiter sees it.
#[derive(Debug)]
pub struct Fetched {
    /// The answer (kept or not), or the gateway's error.
    pub result: Result<Arc<Stored>, GatewayError>,
    /// Why the answer was not cached, when it was not.
    pub not_cached: Option<NoCacheReason>,
    /// Upstream status, when an answer came back.
    pub upstream_status: Option<StatusCode>,
    /// Time the upstream exchange took.
    pub upstream_elapsed: Duration,
}

/// What the access log needs about a request beyond its response.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub route: Route,
    pub cache: Option<CacheOutcome>,
    pub upstream_status: Option<StatusCode>,
    pub upstream_elapsed: Option<Duration>,
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    app: AppId,
    upstream: Upstream,
    policy: Policy,
    cache: Cache,
    flights: Arc<SingleFlight<CacheKey, FlightValue>>,
    access_log: bool,
}

impl Gateway {
    /// Builds the gateway from validated config.
    pub fn new(config: &Config) -> Result<Arc<Gateway>, UpstreamSetupError> {
        Ok(Arc::new(Gateway {
            app: AppId(0),
            upstream: Upstream::new(&config.upstream)?,
            policy: Policy::new(&config.cache),
            cache: Cache::new(config.cache.max_bytes),
            flights: Arc::default(),
            access_log: config.log.access_log,
        }))
    }

    /// The cache (for operations and tests).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Answers one request. Never fails: every error becomes a response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Full<Bytes>> {
        let start = Instant::now();
        let (resp, info) = self.route(req.method(), req.uri().path()).await;
        if self.access_log {
            log_access(&req, &resp, &info, start.elapsed());
        }
        resp
    }

    async fn route(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
    ) -> (Response<Full<Bytes>>, RequestInfo) {
        let mut info = RequestInfo {
            route: Route::Unknown,
            cache: None,
            upstream_status: None,
            upstream_elapsed: None,
        };
        if let Some(id) = path.strip_prefix(RUN_DETAIL_PREFIX) {
            if !id.contains('/') {
                info.route = Route::RunDetail;
                if method != Method::GET && method != Method::HEAD {
                    return (GatewayError::MethodNotAllowed.to_response(), info);
                }
                let Ok(run) = RunId::parse(id) else {
                    return (GatewayError::InvalidRunId.to_response(), info);
                };
                let resp = self.run_detail(run, &mut info).await;
                return (resp, info);
            }
        } else if path == "/healthz" {
            info.route = Route::Health;
            if method != Method::GET && method != Method::HEAD {
                return (GatewayError::MethodNotAllowed.to_response(), info);
            }
            let mut r = Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return (r, info);
        }
        (GatewayError::RouteNotFound.to_response(), info)
    }

    async fn run_detail(
        self: &Arc<Self>,
        run: RunId,
        info: &mut RequestInfo,
    ) -> Response<Full<Bytes>> {
        let key = CacheKey { app: self.app, run };
        if let Some(hit) = self.cache.get(&key) {
            info.cache = Some(CacheOutcome::Hit);
            return answer(&hit, CacheOutcome::Hit);
        }
        let gw = Arc::clone(self);
        let flown = self
            .flights
            .run(
                key,
                || self.cache.get(&key).map(FlightValue::Cached),
                move || gw.fetch(key),
            )
            .await;
        let (fetched, role) = match flown {
            Ok(v) => v,
            Err(_) => {
                info.cache = Some(CacheOutcome::Miss);
                return with_x_cache(GatewayError::Internal.to_response(), CacheOutcome::Miss);
            }
        };
        let fetched = match fetched {
            FlightValue::Fetched(f) => f,
            FlightValue::Cached(hit) => {
                info.cache = Some(CacheOutcome::Hit);
                return answer(&hit, CacheOutcome::Hit);
            }
        };
        let outcome = match role {
            Role::Leader => CacheOutcome::Miss,
            Role::Follower | Role::Rechecked => CacheOutcome::Coalesced,
        };
        info.cache = Some(outcome);
        info.upstream_status = fetched.upstream_status;
        if role == Role::Leader {
            info.upstream_elapsed = Some(fetched.upstream_elapsed);
        }
        match &fetched.result {
            Ok(stored) => answer(stored, outcome),
            Err(e) => with_x_cache(e.to_response(), outcome),
        }
    }

    /// The shared fetch: one upstream exchange, the policy's decision, the cache insert.
    async fn fetch(self: Arc<Self>, key: CacheKey) -> FlightValue {
        let t = Instant::now();
        let r = self.upstream.fetch_run(key.run, None).await;
        let upstream_elapsed = t.elapsed();
        let fetched = match r {
            Ok(a) => {
                let (class, ttl, not_cached) = match self.policy.decide(a.status, &a.body) {
                    Decision::Keep { class, ttl } => (Some(class), ttl, None),
                    Decision::Pass(reason) => (None, None, Some(reason)),
                };
                let stored = Arc::new(Stored {
                    status: a.status,
                    headers: a.headers,
                    body: a.body,
                    class,
                    ttl,
                    fetched_at: Instant::now(),
                });
                self.cache.insert(key, Arc::clone(&stored));
                Fetched {
                    result: Ok(stored),
                    not_cached,
                    upstream_status: Some(a.status),
                    upstream_elapsed,
                }
            }
            Err(e) => Fetched {
                result: Err(e),
                not_cached: None,
                upstream_status: None,
                upstream_elapsed,
            },
        };
        FlightValue::Fetched(Arc::new(fetched))
    }
}

/// What a flight yields: a fresh fetch, or a cache entry the re-check under the flight lock
/// found (a flight for the key landed just before).
#[derive(Clone)]
enum FlightValue {
    Fetched(Arc<Fetched>),
    Cached(Arc<Stored>),
}

/// Builds the client's response from a stored answer: the bytes as received, the kept headers,
/// `X-Cache`, and `Age` when served from the cache.
fn answer(s: &Stored, outcome: CacheOutcome) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(s.body.clone()));
    *resp.status_mut() = s.status;
    let h = resp.headers_mut();
    h.reserve(6);
    let KeptHeaders {
        content_type,
        x_version,
        x_env,
        retry_after,
    } = &s.headers;
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
    h.insert(X_CACHE.clone(), outcome.header());
    if outcome == CacheOutcome::Hit {
        h.insert(AGE, HeaderValue::from(s.fetched_at.elapsed().as_secs()));
    }
    resp
}

fn with_x_cache(mut resp: Response<Full<Bytes>>, outcome: CacheOutcome) -> Response<Full<Bytes>> {
    resp.headers_mut().insert(X_CACHE.clone(), outcome.header());
    resp
}

fn log_access<B>(
    req: &Request<B>,
    resp: &Response<Full<Bytes>>,
    info: &RequestInfo,
    elapsed: Duration,
) {
    tracing::info!(
        target: "access",
        method = %req.method(),
        path = req.uri().path(),
        status = resp.status().as_u16(),
        route = info.route.as_str(),
        cache = info.cache.map_or("none", CacheOutcome::as_str),
        upstream_status = info.upstream_status.map(|s| s.as_u16()),
        upstream_ms = info.upstream_elapsed.map(|d| d.as_secs_f64() * 1e3),
        latency_us = elapsed.as_micros() as u64,
    );
}
