//! The request handler: routing, the cache lookup and the shared upstream fetch.
//!
//! Invariant: a run-detail request reaches the upstream only with a valid, canonical run id and
//! only when the cache has no live entry and no fetch for the same (app, run) is in flight; what
//! the fetch brings back is cached only as [`Policy::decide`] says, before waiters are woken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AGE, CONTENT_TYPE, RETRY_AFTER, WARNING};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;

use arc_swap::ArcSwap;
use serde::Serialize;
use std::sync::{Mutex, PoisonError};

use crate::access_log::{AccessLine, AccessLog};
use crate::apps::App;
use crate::cache::{AppId, Cache, CacheKey, KeptHeaders, Stored};
use crate::clients::{Client, ClientTable};
use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::flight::{Role, SingleFlight};
use crate::intake;
use crate::metrics::{ClassLabel, Metrics, ReasonLabel, RejectReason};
use crate::outcome::{CacheOutcome, Route, UpstreamOutcome};
use crate::policy::{Decision, EntryClass, Policy};
use crate::readiness::Readiness;
use crate::reload::{check_apps, Applied, ReloadError, ReloadLog};
use crate::request_id;
use crate::resilience::{is_failure, jitter, retry_after, Refused, RetryPolicy};
use crate::run_id::RunId;
use crate::shared::{
    LockResult, Lookup, PutOutcome, SharedConfigError, SharedError, SharedStats, SharedTier,
    WaitOutcome,
};
use crate::slots::{client_share_slots, UpstreamSlots};
use crate::tls::TlsAcceptor;
use crate::upstream::{UpstreamAnswer, UpstreamSetupError, X_ENV, X_REQUEST_ID, X_VERSION};

/// Path prefix of the run-detail route, as Dify serves it under `/v1`.
pub const RUN_DETAIL_PREFIX: &str = "/v1/workflows/run/";

/// `X-Cache` response header.
pub static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// The result of one shared upstream fetch, as every waiter sees it.
#[derive(Debug)]
pub struct Fetched {
    /// The answer (kept or not), or the gateway's error.
    pub result: Result<Arc<Stored>, GatewayError>,
    /// Upstream status, when an answer came back.
    pub upstream_status: Option<StatusCode>,
    /// Time the upstream exchange took.
    pub upstream_elapsed: Duration,
}

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error(transparent)]
    Shared(#[from] SharedConfigError),
}

/// What the access log and metrics need about a request beyond its response.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub route: Route,
    pub cache: Option<CacheOutcome>,
    pub rejected: Option<RejectReason>,
    /// The `code` of the gateway's own error answer, when it gave one.
    pub error: Option<&'static str>,
    pub upstream_status: Option<StatusCode>,
    pub upstream_elapsed: Option<Duration>,
    /// The app the request was served for.
    pub app: Option<AppId>,
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    /// The apps served; the first is the default app.
    apps: Vec<Arc<App>>,
    /// Who may come in, swapped whole on reload.
    clients: ArcSwap<ClientTable>,
    /// Upstream requests in flight: the global cap and each app's share (each client's share
    /// lives with the client).
    upstream_slots: UpstreamSlots,
    /// The Redis/Valkey tier shared with other replicas, when configured.
    shared: Option<SharedTier>,
    /// Shared-tier error counts already exported as metrics.
    shared_seen: Mutex<SharedStats>,
    /// The kept headers of the last upstream answer, shared by entries whose headers match.
    last_headers: Mutex<Option<Arc<KeptHeaders>>>,
    /// Retries of transient upstream failures.
    retry: RetryPolicy,
    /// Deadline of one fetch, retries included.
    total_timeout: Duration,
    /// Time a request body (read and dropped) may take to arrive: `server.header_read_timeout`.
    body_read_timeout: Duration,
    policy: Policy,
    cache: Cache,
    /// The configured cap, reported by the admin API.
    max_bytes: u64,
    flights: Arc<SingleFlight<CacheKey, FlightValue>>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Where the one line per request goes; `None` when the access log is off.
    access_log: Option<Arc<AccessLog>>,
    /// Reloads so far and the settings they cannot change.
    reloads: ReloadLog,
}

/// `/admin/cache/stats` body.
#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub entries: u64,
    pub weighted_bytes: u64,
    pub max_bytes: u64,
    pub terminal: ClassReport,
    pub running: ClassReport,
    pub not_found: ClassReport,
    pub fetches_in_flight: usize,
}

/// Entries and bytes of one entry class.
#[derive(Debug, Serialize)]
pub struct ClassReport {
    pub entries: i64,
    pub bytes: i64,
}

impl Gateway {
    /// Builds the gateway from validated config, without an access log.
    pub fn new(config: &Config) -> Result<Arc<Gateway>, SetupError> {
        Gateway::with_access_log(config, None)
    }

    /// Builds the gateway from validated config; with `log.access_log` on, each public request
    /// makes one line in `access_log`.
    pub fn with_access_log(
        config: &Config,
        access_log: Option<Arc<AccessLog>>,
    ) -> Result<Arc<Gateway>, SetupError> {
        let metrics = Arc::new(Metrics::new());
        let apps = config
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| App::new(AppId(i as u32), a, &config.upstream).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let readiness = Arc::new(Readiness::new(&apps, config.admin.ready_max_age));
        let shared = config.shared.clone().map(SharedTier::new).transpose()?;
        let reloads = ReloadLog::new(config, &metrics);
        Ok(Arc::new(Gateway {
            shared,
            shared_seen: Mutex::new(SharedStats::default()),
            last_headers: Mutex::new(None),
            apps,
            clients: ArcSwap::from_pointee(ClientTable::new(
                &config.clients,
                client_share_slots(&config.upstream, config.clients.len()),
                &metrics,
            )),
            policy: Policy::new(&config.cache),
            cache: Cache::with_largest_body(
                config.cache.max_bytes,
                config.upstream.max_body_bytes as u64,
                config.cache.stale_if_error,
                metrics.cache.clone(),
            ),
            retry: RetryPolicy::new(&config.upstream.retry),
            total_timeout: config.upstream.total_timeout,
            body_read_timeout: config.server.header_read_timeout,
            max_bytes: config.cache.max_bytes,
            flights: Arc::default(),
            upstream_slots: UpstreamSlots::new(&config.upstream, config.apps.len()),
            metrics,
            readiness,
            access_log: access_log.filter(|_| config.log.access_log),
            reloads,
        }))
    }

    /// Applies a re-read configuration (SIGHUP): the client table and the app keys (rotated
    /// keys go upstream from the next exchange), and reloads the TLS certificate when `tls` is
    /// given; then logs, counts and records the outcome (see [`crate::reload`]). Nothing but
    /// the certificate changes unless the configuration validates and names the same apps.
    pub fn reload(
        &self,
        loaded: Result<Config, ConfigError>,
        tls: Option<&TlsAcceptor>,
    ) -> Result<Applied, ReloadError> {
        let outcome = loaded
            .map_err(ReloadError::from)
            .and_then(|c| self.apply_config(&c));
        let outcome = crate::reload::with_tls(outcome, tls);
        self.reloads.record(&outcome, &self.metrics);
        outcome
    }

    fn apply_config(&self, config: &Config) -> Result<Applied, ReloadError> {
        check_apps(&self.apps, &config.apps)?;
        if config.clients.is_empty() && !self.clients.load().is_open() {
            return Err(ReloadError::WouldOpen);
        }
        // Every key is checked before any is installed.
        let keys = self
            .apps
            .iter()
            .zip(&config.apps)
            .map(|(a, c)| {
                a.prepare_key(c).map_err(|source| ReloadError::Key {
                    app: a.name.to_string(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys_rotated = Vec::new();
        for (app, key) in self.apps.iter().zip(keys) {
            if let Some(k) = key {
                app.install_key(k);
                keys_rotated.push(app.name.to_string());
            }
        }
        // The cap is fixed at start-up; the share follows the new number of clients. Each
        // client starts with its whole share free: fetches started before the reload still hold
        // slots of the old one until they end (the global cap holds throughout).
        let share = client_share_slots(&config.upstream, config.clients.len());
        let table = ClientTable::new(&config.clients, share, &self.metrics);
        let clients = table.len();
        self.clients.store(Arc::new(table));
        Ok(Applied {
            clients,
            keys_rotated,
            needs_restart: self.reloads.needs_restart(config),
        })
    }

    /// Reloads so far (for `/admin/reload`).
    pub fn reloads(&self) -> &ReloadLog {
        &self.reloads
    }

    /// The cross-replica identity of app `i` (see [`App::tag`]).
    pub fn app_tag(&self, i: usize) -> String {
        self.apps[i].tag().to_string()
    }

    /// True when no clients are configured (everyone may use the default app).
    pub fn is_open(&self) -> bool {
        self.clients.load().is_open()
    }

    /// The cache (for operations and tests).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics exposition, with the shared tier's error counts brought up to date.
    pub fn metrics_text(&self) -> String {
        if let Some(shared) = &self.shared {
            let now = shared.stats();
            let mut seen = self
                .shared_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for e in SharedError::ALL {
                let delta = now.get(e).saturating_sub(seen.get(e));
                if delta > 0 {
                    self.metrics
                        .shared_tier_errors
                        .get_or_create(&ReasonLabel { reason: e.as_str() })
                        .inc_by(delta);
                }
            }
            *seen = now;
        }
        self.metrics.encode()
    }

    /// Per-app upstream probes.
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Answers one request. Never fails: every error becomes a response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body + Unpin,
    {
        let start = Instant::now();
        let (req, body) = req.into_parts();
        let rid = request_id::for_request(&req.headers);
        let (mut resp, info, client) = self.route(&req, body, &rid).await;
        let elapsed = start.elapsed();
        self.metrics.request(
            info.route,
            resp.status().as_u16(),
            info.cache,
            client.as_deref().map(Client::label),
            elapsed,
        );
        if let Some(r) = info.rejected {
            self.metrics.reject(r);
        }
        if let Some(log) = &self.access_log {
            log.record(&AccessLine {
                request_id: rid.to_str().unwrap_or("-"),
                client: client.as_deref().map_or("-", |c| &*c.name),
                app: info.app.map_or("-", |a| &*self.apps[a.0 as usize].name),
                method: req.method.as_str(),
                path: req.uri.path(),
                status: resp.status().as_u16(),
                route: info.route.as_str(),
                cache: info.cache.map_or("none", CacheOutcome::as_str),
                error: info.error,
                upstream_status: info.upstream_status.map(|s| s.as_u16()),
                upstream_ms: info.upstream_elapsed.map(|d| d.as_secs_f64() * 1e3),
                latency_us: elapsed.as_micros() as u64,
            });
        }
        resp.headers_mut().insert(X_REQUEST_ID.clone(), rid);
        resp
    }

    async fn route<B>(
        self: &Arc<Self>,
        req: &Parts,
        body: B,
        rid: &HeaderValue,
    ) -> (Response<Full<Bytes>>, RequestInfo, Option<Arc<Client>>)
    where
        B: Body + Unpin,
    {
        let mut info = RequestInfo {
            route: Route::Unknown,
            cache: None,
            rejected: None,
            error: None,
            upstream_status: None,
            upstream_elapsed: None,
            app: None,
        };
        let refuse = |mut info: RequestInfo, reason, e: GatewayError| {
            info.rejected = Some(reason);
            info.error = Some(e.as_str());
            (e.to_response(), info, None)
        };
        // Where the request ends is settled first, on every path: a framing that could be
        // read two ways is refused before anything is answered for it.
        if let Err(r) = intake::check_framing(&req.headers) {
            return refuse(info, r.reason(), r.into());
        }
        let (method, path) = (&req.method, intake::merge_slashes(req.uri.path()));
        if let Some(id) = path.strip_prefix(RUN_DETAIL_PREFIX) {
            if !id.contains('/') {
                info.route = Route::RunDetail;
                if method != Method::GET && method != Method::HEAD {
                    return refuse(info, RejectReason::Method, GatewayError::MethodNotAllowed);
                }
                if let Err(r) = intake::discard_body(body, self.body_read_timeout).await {
                    return refuse(info, r.reason(), r.into());
                }
                // Authenticate before looking at the id: an outsider learns nothing.
                let client = {
                    let table = self.clients.load();
                    if table.is_open() {
                        None
                    } else {
                        match table.authenticate(&req.headers) {
                            Ok(c) => Some(c),
                            Err(_) => {
                                return refuse(info, RejectReason::Auth, GatewayError::Unauthorized)
                            }
                        }
                    }
                };
                if let Some(c) = &client {
                    if let Err(wait) = c.check_rate() {
                        let e = GatewayError::RateLimited {
                            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                        };
                        let (r, i, _) = refuse(info, RejectReason::RateLimit, e);
                        return (r, i, client);
                    }
                }
                let Ok(run) = RunId::parse(id) else {
                    let (r, i, _) = refuse(info, RejectReason::BadId, GatewayError::InvalidRunId);
                    return (r, i, client);
                };
                let app = match &client {
                    Some(c) => &self.apps[c.app],
                    None => &self.apps[0],
                };
                info.app = Some(app.id);
                let resp = self
                    .run_detail(app, run, rid, client.as_ref(), &mut info)
                    .await;
                return (resp, info, client);
            }
        } else if path == "/healthz" {
            info.route = Route::Health;
            if method != Method::GET && method != Method::HEAD {
                return refuse(info, RejectReason::Method, GatewayError::MethodNotAllowed);
            }
            if let Err(r) = intake::discard_body(body, self.body_read_timeout).await {
                return refuse(info, r.reason(), r.into());
            }
            let mut r = Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return (r, info, None);
        }
        refuse(info, RejectReason::BadRoute, GatewayError::RouteNotFound)
    }

    /// Purges one run for the named app, or for every app when `app` is `None`. `None` when
    /// no app has that name; otherwise how many entries were dropped.
    pub async fn purge_run(&self, run: RunId, app: Option<&str>) -> Option<u64> {
        let targets: Vec<&Arc<App>> = match app {
            Some(name) => {
                let found: Vec<_> = self.apps.iter().filter(|a| a.name == name).collect();
                if found.is_empty() {
                    return None;
                }
                found
            }
            None => self.apps.iter().collect(),
        };
        let mut n = 0;
        for a in targets {
            let key = CacheKey { app: a.id, run };
            if self.cache.lookup(&key).is_some() {
                n += 1;
            }
            self.cache.remove(&key);
            if let Some(shared) = &self.shared {
                if let Ok(true) = shared.purge(&a.tag(), run).await {
                    n = n.max(1);
                }
            }
        }
        Some(n)
    }

    /// Drops every cached entry; returns how many there were.
    pub async fn purge_all(&self) -> u64 {
        let mut n = self.cache.stats().entries;
        if let Some(shared) = &self.shared {
            if let Ok(m) = shared.purge_all().await {
                n = n.max(m);
            }
        }
        self.cache.clear();
        // Run the invalidation now so gauges and the next stats call reflect it.
        self.cache.stats();
        n
    }

    /// Cache figures for the admin API.
    pub fn cache_report(&self) -> CacheReport {
        let s = self.cache.stats();
        let class = |c: EntryClass| {
            let l = ClassLabel { class: c.as_str() };
            ClassReport {
                entries: self.metrics.cache.entries.get_or_create(&l).get(),
                bytes: self.metrics.cache.bytes.get_or_create(&l).get(),
            }
        };
        CacheReport {
            entries: s.entries,
            weighted_bytes: s.weighted_bytes,
            max_bytes: self.max_bytes,
            terminal: class(EntryClass::Terminal),
            running: class(EntryClass::Running),
            not_found: class(EntryClass::NotFound),
            fetches_in_flight: self.flights.len(),
        }
    }

    async fn run_detail(
        self: &Arc<Self>,
        app: &Arc<App>,
        run: RunId,
        rid: &HeaderValue,
        client: Option<&Arc<Client>>,
        info: &mut RequestInfo,
    ) -> Response<Full<Bytes>> {
        let key = CacheKey { app: app.id, run };
        let stale = match self.cache.lookup(&key) {
            Some(found) if found.fresh => {
                info.cache = Some(CacheOutcome::Hit);
                return answer(&found.stored, CacheOutcome::Hit);
            }
            Some(found) => Some(found.stored),
            None => None,
        };
        let gw = Arc::clone(self);
        let app = Arc::clone(app);
        let rid = rid.clone();
        // The fetch is charged to this request's client if it starts it (the leader).
        let leader = client.cloned();
        let flown = self
            .flights
            .run(
                key,
                || self.cache.get(&key).map(FlightValue::Cached),
                move || gw.fetch(app, key, rid, leader),
            )
            .await;
        let (fetched, role) = match flown {
            Ok(v) => v,
            Err(_) => {
                info.cache = Some(CacheOutcome::Miss);
                info.error = Some(GatewayError::Internal.as_str());
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
        if let Some(old) = stale.filter(|_| refresh_failed(&fetched.result)) {
            info.cache = Some(CacheOutcome::Stale);
            self.metrics.stale_served.inc();
            let mut resp = answer(&old, CacheOutcome::Stale);
            resp.headers_mut().insert(
                WARNING,
                HeaderValue::from_static("111 dify-gateway \"Revalidation Failed\""),
            );
            return resp;
        }
        match &fetched.result {
            Ok(stored) => answer(stored, outcome),
            Err(e) => {
                info.error = Some(e.as_str());
                with_x_cache(e.to_response(), outcome)
            }
        }
    }

    /// The fetch behind a flight: the shared tier first (when configured), under its
    /// fleet-wide lock the upstream, then the shared tier is filled for the other replicas.
    /// Every shared-tier failure falls back to the upstream: Redis down is not an outage.
    async fn fetch(
        self: Arc<Self>,
        app: Arc<App>,
        key: CacheKey,
        rid: HeaderValue,
        leader: Option<Arc<Client>>,
    ) -> FlightValue {
        let leader = leader.as_deref();
        let Some(shared) = self.shared.clone() else {
            return self.fetch_upstream(&app, key, &rid, leader).await.0;
        };
        // One tag for the whole fetch, even if the key rotates meanwhile.
        let tag = app.tag();
        match shared.get(&tag, key.run).await {
            Lookup::Hit(stored) => return self.warm_from_shared(key, stored),
            // Redis is not answering: do not spend more timeouts on the lock.
            Lookup::Unavailable => return self.fetch_upstream(&app, key, &rid, leader).await.0,
            Lookup::Miss => {}
        }
        match shared.try_lock(&tag, key.run).await {
            LockResult::Acquired(token) => {
                let (value, kept) = self.fetch_upstream(&app, key, &rid, leader).await;
                let written = match kept {
                    Some(stored) => matches!(
                        shared.put(&tag, key.run, &stored).await,
                        PutOutcome::Written
                    ),
                    None => false,
                };
                shared.notify_done(&tag, key.run, written).await;
                shared.release(token).await;
                value
            }
            LockResult::Held => {
                let wait = shared.config().wait_timeout;
                if let WaitOutcome::Notified { stored: true } =
                    shared.wait(&tag, key.run, wait).await
                {
                    if let Lookup::Hit(stored) = shared.get(&tag, key.run).await {
                        return self.warm_from_shared(key, stored);
                    }
                }
                // The holder failed, crashed or took too long: fetch ourselves.
                self.fetch_upstream(&app, key, &rid, leader).await.0
            }
            LockResult::Unavailable => self.fetch_upstream(&app, key, &rid, leader).await.0,
        }
    }

    /// An entry another replica fetched: warm the in-process cache with it.
    fn warm_from_shared(&self, key: CacheKey, stored: Arc<Stored>) -> FlightValue {
        self.metrics.shared_tier_hits.inc();
        self.cache.insert(key, Arc::clone(&stored));
        FlightValue::Cached(stored)
    }

    /// One upstream exchange, the policy's decision, the in-process cache insert. Returns the
    /// flight's value and the entry when it was kept.
    async fn fetch_upstream(
        &self,
        app: &App,
        key: CacheKey,
        rid: &HeaderValue,
        leader: Option<&Client>,
    ) -> (FlightValue, Option<Arc<Stored>>) {
        let t = Instant::now();
        let r = self.call_upstream(app, key.run, rid, leader).await;
        let upstream_elapsed = t.elapsed();
        match &r {
            // Refusals of the gateway's own making are counted in metrics; logging each one
            // would flood the log exactly when the upstream is down.
            Err(e @ (GatewayError::CircuitOpen { .. } | GatewayError::Overloaded)) => {
                tracing::debug!(request_id = ?rid, app = %app.name, run = %key.run, error = e.as_str(), "upstream fetch refused");
            }
            Err(e) => {
                tracing::warn!(request_id = ?rid, app = %app.name, run = %key.run, error = e.as_str(), "upstream fetch failed");
            }
            Ok(_) => {}
        }
        let fetched = match r {
            Ok(a) => {
                let (class, ttl) = match self.policy.decide(a.status, &a.body) {
                    Decision::Keep { class, ttl } => (Some(class), ttl),
                    Decision::Pass(_) => (None, None),
                };
                // A kept body is copied out of the connection's read buffer: as received it
                // is a slice that would keep the whole (much larger) buffer alive in the cache.
                let body = if class.is_some() {
                    Bytes::copy_from_slice(&a.body)
                } else {
                    a.body
                };
                let stored = Arc::new(Stored {
                    status: a.status,
                    headers: self.intern_headers(a.headers),
                    body,
                    class,
                    ttl,
                    fetched_at: Instant::now(),
                });
                self.cache.insert(key, Arc::clone(&stored));
                Fetched {
                    result: Ok(stored),
                    upstream_status: Some(a.status),
                    upstream_elapsed,
                }
            }
            Err(e) => Fetched {
                result: Err(e),
                upstream_status: None,
                upstream_elapsed,
            },
        };
        let kept = match &fetched.result {
            Ok(s) if s.class.is_some() => Some(Arc::clone(s)),
            _ => None,
        };
        (FlightValue::Fetched(Arc::new(fetched)), kept)
    }

    /// The shared instance of `h` when it equals the last headers seen.
    fn intern_headers(&self, h: KeptHeaders) -> Arc<KeptHeaders> {
        let mut last = self
            .last_headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*last {
            Some(l) if **l == h => Arc::clone(l),
            _ => {
                let a = Arc::new(h);
                *last = Some(Arc::clone(&a));
                a
            }
        }
    }

    /// The upstream exchange behind a fetch: the app's circuit breaker, a slot under the
    /// global concurrency cap and the leader's and app's shares, and retries of transient
    /// failures within the fetch's deadline.
    async fn call_upstream(
        &self,
        app: &App,
        run: RunId,
        rid: &HeaderValue,
        leader: Option<&Client>,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let deadline = Instant::now() + self.total_timeout;
        let mut attempt = 1;
        loop {
            if let Err(Refused(wait)) = app.breaker.admit() {
                // Refused before any exchange: counted, but no latency to observe.
                self.metrics.upstream(UpstreamOutcome::CircuitOpen, None);
                return Err(GatewayError::CircuitOpen {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
            let share = leader.and_then(|c| c.upstream_share.as_ref());
            let permit = match self.upstream_slots.acquire(app.id, share).await {
                Ok(slot) => slot,
                Err(full) => {
                    self.metrics.reject(full);
                    return Err(GatewayError::Overloaded);
                }
            };
            let t = Instant::now();
            let r = app.upstream.fetch_run(run, Some(rid), deadline).await;
            drop(permit);
            let outcome = match &r {
                Ok(a) => UpstreamOutcome::from_status(a.status),
                Err(e) => UpstreamOutcome::from_error(e),
            };
            self.metrics.upstream(outcome, Some(t.elapsed()));
            if app.breaker.record(is_failure(&r)) {
                tracing::warn!(app = %app.name, "upstream circuit opened after repeated failures");
            }
            self.metrics
                .circuit_open
                .set(self.apps.iter().filter(|a| a.breaker.is_open()).count() as i64);
            if attempt >= self.retry.max_attempts || !RetryPolicy::retryable(&r) {
                return r;
            }
            let hint = r.as_ref().ok().and_then(retry_after);
            let Some(pause) = self.retry.delay(attempt, hint, jitter()) else {
                return r;
            };
            if Instant::now() + pause >= deadline {
                return r;
            }
            tracing::debug!(request_id = ?rid, app = %app.name, attempt, ?pause, outcome = outcome.as_str(), "retrying upstream");
            self.metrics.retries.inc();
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }
}

/// Did a refresh fail in a way that makes a stale answer better than the failure? Transport
/// errors, the gateway's own refusals (overload, circuit open), 429 and 5xx do; an answer the
/// upstream gave deliberately (200, 404, 401, 403) does not.
fn refresh_failed(r: &Result<Arc<Stored>, GatewayError>) -> bool {
    match r {
        Ok(s) => s.status == StatusCode::TOO_MANY_REQUESTS || s.status.is_server_error(),
        Err(_) => true,
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
fn answer(s: &Arc<Stored>, outcome: CacheOutcome) -> Response<Full<Bytes>> {
    // The body is lent through the entry's own reference count, already touched by the lookup,
    // rather than the body's: over many runs that count is a cache miss per hit.
    let mut resp = Response::new(Full::new(Bytes::from_owner(StoredBody(Arc::clone(s)))));
    *resp.status_mut() = s.status;
    let h = resp.headers_mut();
    h.reserve(6);
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
    h.insert(X_CACHE.clone(), outcome.header());
    if matches!(outcome, CacheOutcome::Hit | CacheOutcome::Stale) {
        h.insert(AGE, age_header(s.fetched_at.elapsed().as_secs()));
    }
    resp
}

/// An entry lending its body to a response.
struct StoredBody(Arc<Stored>);

impl AsRef<[u8]> for StoredBody {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
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

fn with_x_cache(mut resp: Response<Full<Bytes>>, outcome: CacheOutcome) -> Response<Full<Bytes>> {
    resp.headers_mut().insert(X_CACHE.clone(), outcome.header());
    resp
}
