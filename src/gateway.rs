//! The gateway: the state every request shares, and the dispatch of one request to its route.
//!
//! Invariant: every request is answered, exactly once, through [`Gateway::handle`], after the
//! checks at the door in one order — framing, route, method, body, client token, rate limit,
//! then the route's own (the run id) — so an outsider learns nothing past the token check; a
//! client reaches only its own app. Each request gets an `X-Request-Id`, one access-log line and
//! its metrics, whatever its route and outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Body as HttpBody;
use serde::Serialize;

use crate::access_log::{AccessLine, AccessLog};
use crate::body::{Body, BodyError};
use crate::cache::fetch::Fetch;
use crate::cache::{AppId, Cache};
use crate::clients::{Client, ClientTable};
use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::idempotency::{self, Idempotency};
use crate::intake;
use crate::metrics::{ClassLabel, Metrics, RejectReason};
use crate::outcome::CacheOutcome;
use crate::ownership::{Access, Kind, Ownership};
use crate::passthrough::meta::Kept;
use crate::passthrough::{BodyKind, Forward, Idempotent, Passthrough, Served};
use crate::policy::{EntryClass, Policy};
use crate::readiness::Readiness;
use crate::reload::{check_apps, Applied, ReloadError, ReloadLog};
use crate::request_id;
use crate::routes::run_detail::{RunDetail, X_CACHE};
use crate::routes::{health, merge_slashes, passthrough, run_events, subscribe, Misroute, Route};
use crate::run_id::RunId;
use crate::shared::{SharedConfigError, SharedTier};
use crate::starts::{StartRefused, Starts, StreamPermit};
use crate::tls::TlsAcceptor;
use crate::upstream::{client_share_slots, App, UpstreamSetupError, Upstreams, X_REQUEST_ID};
use crate::usage::{self, Usage};
use crate::watch::Watchers;
use crate::webhooks::Webhooks;

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error(transparent)]
    Shared(#[from] SharedConfigError),
}

/// What the access log and metrics need about a request beyond its response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo {
    /// The route it took; `None` when no route has its path.
    pub route: Option<Route>,
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
    /// The apps and their upstreams; the first app is the default app.
    upstreams: Arc<Upstreams>,
    /// Who may come in, swapped whole on reload.
    clients: ArcSwap<ClientTable>,
    /// The run-detail route: the cache and the fetches that fill it.
    run_detail: RunDetail,
    /// Which client created which run, task and file (shared with the run-detail route).
    ownership: Arc<Ownership>,
    /// Usage figures and daily quotas (see [`crate::usage`]).
    usage: Arc<Usage>,
    /// The shared tier, when configured (for the status page).
    shared: Option<SharedTier>,
    /// Each client's run-start and open-stream limits, following reloads.
    starts: Starts,
    /// The passed-through routes.
    passthrough: Passthrough,
    /// Finished runs announced to clients' webhooks.
    webhooks: Arc<Webhooks>,
    /// Run starts' `Idempotency-Key`s and what they made.
    idempotency: Arc<Idempotency>,
    /// `passthrough.allow_unlisted`: other paths under `/v1/` are passed, not refused.
    allow_unlisted: bool,
    /// Time a request body (read and dropped) may take to arrive: `server.header_read_timeout`.
    body_read_timeout: Duration,
    /// The configured cap, reported by the admin API.
    max_bytes: u64,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Where the one line per request goes; `None` when the access log is off.
    access_log: Option<Arc<AccessLog>>,
    /// Reloads so far and the settings they cannot change.
    reloads: ReloadLog,
    /// `stream.heartbeat`, for status streams.
    heartbeat: Duration,
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

/// A request refused at the door: why (the metric label) and the answer.
struct Refused {
    reason: RejectReason,
    error: GatewayError,
}

impl Refused {
    fn new(reason: RejectReason, error: impl Into<GatewayError>) -> Refused {
        Refused {
            reason,
            error: error.into(),
        }
    }
}

impl From<intake::Refusal> for Refused {
    fn from(r: intake::Refusal) -> Refused {
        Refused::new(r.reason(), r)
    }
}

impl From<StartRefused> for Refused {
    fn from(r: StartRefused) -> Refused {
        Refused::new(r.reason(), r)
    }
}

impl From<Misroute> for Refused {
    fn from(m: Misroute) -> Refused {
        match m {
            Misroute::NotFound => Refused::new(RejectReason::BadRoute, GatewayError::RouteNotFound),
            Misroute::Method(r) => Refused::new(
                RejectReason::Method,
                GatewayError::MethodNotAllowed { allow: r.allowed() },
            ),
        }
    }
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
        let upstreams = Arc::new(Upstreams::new(config, &metrics)?);
        let readiness = Arc::new(Readiness::new(upstreams.apps(), config.admin.ready_max_age));
        let shared = config
            .shared
            .clone()
            .map(|c| SharedTier::counted(c, &metrics.shared_tier_errors))
            .transpose()?;
        let cache = Cache::with_largest_body(
            config.cache.max_bytes,
            config.upstream.max_body_bytes as u64,
            config.cache.stale_if_error,
            metrics.cache.clone(),
        );
        let ownership = Arc::new(Ownership::new(
            &config.ownership,
            &config.apps,
            shared.clone(),
        ));
        let usage = Arc::new(Usage::new(
            &config.clients,
            &app_names(config),
            shared.clone(),
            Arc::clone(&metrics),
        ));
        let fetch = Fetch::new(
            cache.clone(),
            Policy::new(&config.cache),
            shared.clone(),
            Arc::clone(&upstreams),
            Arc::clone(&metrics),
        )
        .with_usage(Arc::clone(&usage), Arc::clone(&ownership))
        .with_not_found_grace(config.cache.not_found_grace);
        let fetch = Arc::new(fetch);
        let watchers = Arc::new(Watchers::new(
            Arc::clone(&fetch),
            config.cache.running_ttl,
            config.longpoll.max_waiters,
            Arc::clone(&metrics),
        ));
        let reloads = ReloadLog::new(config, &metrics);
        let webhooks = Webhooks::new(
            config,
            upstreams.apps(),
            Arc::clone(&fetch),
            shared.clone(),
            Arc::clone(&metrics),
        );
        fetch.announce_to(&webhooks);
        let passthrough = Passthrough::new(
            config,
            Arc::clone(&fetch),
            Arc::clone(&ownership),
            Arc::clone(&usage),
            Arc::clone(&metrics),
            Arc::clone(&webhooks),
        );
        let idempotency = Idempotency::new(
            &config.idempotency,
            config.upstream.run_timeout,
            shared.clone(),
            Some(Arc::clone(&metrics)),
        );
        Ok(Arc::new(Gateway {
            passthrough,
            webhooks,
            idempotency,
            allow_unlisted: config.passthrough.allow_unlisted,
            clients: ArcSwap::from_pointee(ClientTable::new(
                &config.clients,
                client_share_slots(&config.upstream, config.clients.len()),
                &metrics,
            )),
            run_detail: RunDetail::new(
                Arc::clone(&ownership),
                cache,
                fetch,
                Arc::clone(&metrics),
                watchers,
                config.longpoll.max_wait,
            ),
            ownership,
            usage,
            shared,
            starts: Starts::new(&config.clients),
            heartbeat: config.stream.heartbeat,
            upstreams,
            body_read_timeout: config.server.header_read_timeout,
            max_bytes: config.cache.max_bytes,
            metrics,
            readiness,
            access_log: access_log.filter(|_| config.log.access_log),
            reloads,
        }))
    }

    /// Applies a re-read configuration (SIGHUP): the client table, each client's run-start
    /// limits, each app's `isolate_clients` and the app keys (rotated keys go upstream from the
    /// next exchange), and reloads the TLS certificate when `tls` is
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
        let apps = self.upstreams.apps();
        check_apps(apps, &config.apps)?;
        if config.clients.is_empty() && !self.clients.load().is_open() {
            return Err(ReloadError::WouldOpen);
        }
        // Every key is checked before any is installed.
        let keys = apps
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
        for (app, key) in apps.iter().zip(keys) {
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
        self.starts.reload(&config.clients);
        self.usage.reload(&config.clients, &app_names(config));
        self.ownership.set_isolation(&config.apps);
        self.webhooks.reload(&config.clients);
        Ok(Applied {
            clients,
            keys_rotated,
            needs_restart: self.reloads.needs_restart(config),
        })
    }

    /// Shutdown has begun: held requests answer now with the state they have, status streams
    /// end, and no request is held from now on.
    pub fn release_waiters(&self) {
        self.run_detail.watchers().shut_down();
    }

    /// The drain is over: webhook followers and the sender stop (with the shared tier, the
    /// runs they followed and the deliveries they held are handed to the replicas that go on,
    /// or the next start).
    pub async fn stop_webhooks(&self) {
        self.webhooks.shut_down().await;
    }

    /// The run answers followed upstream now (a drain waits for them).
    pub fn followed_runs(&self) -> &Arc<crate::passthrough::Followed> {
        self.passthrough.followed()
    }

    /// Reloads so far (for `/admin/reload`).
    pub fn reloads(&self) -> &ReloadLog {
        &self.reloads
    }

    /// The cross-replica identity of app `i` (see [`App::tag`]).
    pub fn app_tag(&self, i: usize) -> String {
        self.upstreams.apps()[i].tag().to_string()
    }

    /// True when no clients are configured (everyone may use the default app).
    pub fn is_open(&self) -> bool {
        self.clients.load().is_open()
    }

    /// Who created which run, task and file. A handler that creates one records it
    /// ([`Ownership::record_run`] when it sees Dify's `workflow_started`, [`Ownership::record`]
    /// for an uploaded file) before the id reaches the client; a handler that acts on one
    /// (events, stop, preview) asks [`Ownership::check`] first and answers Dify's 404 when it
    /// is not [`Access::allowed`].
    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.ownership
    }

    /// Each client's run-start limits: [`Starts::start`] for a blocking run,
    /// [`Starts::start_streaming`] for a streaming one (its permit held while the client reads
    /// the stream), [`Starts::open_stream`] to follow a run's events. A refusal becomes 429
    /// `too_many_requests` with `Retry-After` through `GatewayError::from`.
    pub fn starts(&self) -> &Starts {
        &self.starts
    }

    /// Usage figures and daily quotas. Run-start handlers call [`Usage::check_quota`] before
    /// starting a run (a refusal is `RejectReason::Quota` with
    /// `GatewayError::quota_exceeded(wait)`; reads are never checked) and
    /// [`Usage::finished_run`] with each finished run they see (a blocking run's `data`, a
    /// `workflow_finished` event's `data`, parsed by `FinishedRun::parse`), counted to the
    /// starting client or `usage::OPEN_CLIENT`; terminal run details are counted by the fetch.
    pub fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    /// The shared tier, when configured.
    pub fn shared_tier(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    /// The configured apps, in order.
    pub fn apps(&self) -> &[Arc<App>] {
        self.upstreams.apps()
    }

    /// The cache (for operations and tests).
    pub fn cache(&self) -> &Cache {
        self.run_detail.cache()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics exposition.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// Per-app upstream probes.
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Answers one request. Never fails: every error becomes a response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        let start = Instant::now();
        let (req, body) = req.into_parts();
        let rid = request_id::for_request(&req.headers);
        let mut info = RequestInfo::default();
        let mut client = None;
        let mut resp = match self
            .dispatch(&req, body, &rid, &mut info, &mut client)
            .await
        {
            Ok(resp) => resp,
            Err(r) => {
                info.rejected = Some(r.reason);
                info.error = Some(r.error.as_str());
                r.error.to_response().map(Body::Full)
            }
        };
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
                app: info
                    .app
                    .map_or("-", |a| &*self.upstreams.apps()[a.0 as usize].name),
                method: req.method.as_str(),
                path: req.uri.path(),
                status: resp.status().as_u16(),
                route: Route::label(info.route),
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

    /// The checks at the door, in their order, then the route's handler. `info` and `client`
    /// are filled in as they become known, so a refusal is logged with what was learnt before.
    async fn dispatch<B>(
        &self,
        req: &Parts,
        body: B,
        rid: &HeaderValue,
        info: &mut RequestInfo,
        client: &mut Option<Arc<Client>>,
    ) -> Result<Response<Body>, Refused>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        let path = merge_slashes(req.uri.path());
        let parsed = Route::parse(&req.method, &path);
        // Where the request ends is settled first, on every path: a framing that could be
        // read two ways is refused before anything is answered for it; a chunked body only
        // where a body is taken.
        let takes_body = matches!(parsed, Ok((r, _)) if r.takes_body());
        intake::check_framing(&req.headers, takes_body)?;
        let (route, param) = parsed.inspect_err(|m| {
            info.route = m.route();
        })?;
        // An unlisted path is passed only when the operator allows it; an HTTP/1 request in
        // absolute form (`GET http://host/v1/...`, a forward-proxy request) is never passed on.
        let proxy_form = req.version < http::Version::HTTP_2 && req.uri.authority().is_some();
        if route.is_passthrough()
            && (proxy_form || route == Route::Unlisted && !self.allow_unlisted)
        {
            return Err(Misroute::NotFound.into());
        }
        info.route = Some(route);
        // The body of a route that takes none is read and dropped now; one that takes a body
        // keeps it for its handler.
        let body = if route.takes_body() {
            Some(body)
        } else {
            intake::discard_body(body, self.body_read_timeout).await?;
            None
        };
        if route.needs_token() {
            // Let in before anything else is looked at: an outsider learns nothing.
            *client = self.authenticate(req, rid)?;
            if let Some(c) = client.as_deref() {
                check_rate(c)?;
            }
        }
        match route {
            Route::Health => Ok(health::answer()),
            Route::RunDetail | Route::RunEvents | Route::RunSubscribe => {
                let run = RunId::parse(param)
                    .map_err(|_| Refused::new(RejectReason::BadId, GatewayError::InvalidRunId))?;
                let app = self.app_of(client.as_deref());
                info.app = Some(app.id);
                let client = client.as_ref();
                let d = &self.run_detail;
                let (resp, served) = match route {
                    // The rarer routes' futures are boxed: inline, their state would be moved
                    // with every request's (the hot path's) future.
                    Route::RunEvents => {
                        let heartbeat = self.heartbeat;
                        Box::pin(run_events::serve(
                            d,
                            app,
                            run,
                            rid,
                            client,
                            &req.headers,
                            heartbeat,
                        ))
                        .await
                    }
                    Route::RunSubscribe => {
                        Box::pin(subscribe::serve(d, &self.webhooks, app, run, rid, client))
                            .await
                            .map_err(|e| Refused::new(RejectReason::NoWebhook, e))?
                    }
                    // A fresh hit is answered without building the futures of the paths that
                    // can wait; those are boxed, so the hit's own future stays small.
                    _ => match d.try_hit(app, run, client, &req.headers) {
                        Some(hit) => hit,
                        None => {
                            Box::pin(d.serve_request(app, run, rid, client, &req.headers)).await
                        }
                    },
                };
                info.cache = Some(served.cache);
                info.error = served.error;
                info.upstream_status = served.upstream_status;
                info.upstream_elapsed = served.upstream_elapsed;
                if served.access == Access::Foreign {
                    info.rejected = Some(RejectReason::NotOwner);
                }
                Ok(resp)
            }
            _ => {
                Box::pin(self.pass(route, param, &path, req, body, rid, info, client.as_deref()))
                    .await
            }
        }
    }

    /// A passed-through route: its id checked, then the request sent to the client's app.
    #[allow(clippy::too_many_arguments)]
    async fn pass<B>(
        &self,
        route: Route,
        param: &str,
        path: &str,
        req: &Parts,
        body: Option<B>,
        rid: &HeaderValue,
        info: &mut RequestInfo,
        client: Option<&Client>,
    ) -> Result<Response<Body>, Refused>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        let content_type = req.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let plan = passthrough::plan(route, &req.method, param, content_type)
            .map_err(|e| Refused::new(RejectReason::BadId, e))?;
        let app = self.app_of(client);
        info.app = Some(app.id);
        let prefix = client.and_then(|c| c.user_prefix.as_ref());
        let path_and_query = passthrough::upstream_path(path, req.uri.query(), prefix)
            .ok_or_else(|| Refused::from(Misroute::NotFound))?;
        let name = client.map(|c| &*c.name);
        // Another client's task, run or file is answered as Dify answers an unknown one.
        let owned = match route {
            Route::TaskStop => Some((Kind::Task, GatewayError::TaskNotFound)),
            Route::Events => Some((Kind::Run, GatewayError::RunNotFound)),
            Route::FilePreview => Some((Kind::File, GatewayError::FileNotFound)),
            _ => None,
        };
        if let Some((kind, not_found)) = owned {
            let id = uuid::Uuid::try_parse(param)
                .map_err(|_| Refused::new(RejectReason::BadId, GatewayError::InvalidRunId))?;
            if !self.ownership.check(app.id, kind, id, name).await.allowed() {
                return Err(Refused::new(RejectReason::NotOwner, not_found));
            }
        }
        if route == Route::Logs
            && self.ownership.isolates(app.id)
            && client.is_some_and(|c| !c.read_app_logs)
        {
            return Err(Refused::new(
                RejectReason::Forbidden,
                GatewayError::LogsForbidden,
            ));
        }
        let permit = match route {
            Route::Events => Some(self.starts.open_stream(name).map_err(Refused::from)?),
            _ => None,
        };
        let starts_run = matches!(route, Route::RunStart | Route::RunStartVersion);
        // A client over its day's quota starts nothing (its reads go on); told once its start's
        // `Idempotency-Key` has been looked at, so a retry of a start already made gets its
        // answer.
        let over_quota = match starts_run {
            true => self
                .usage
                .check_quota(name.unwrap_or(usage::OPEN_CLIENT), &app.name)
                .await
                .err(),
            false => None,
        };
        let starts = &self.starts;
        let admit = move |streaming: bool| {
            if let Some(retry_after) = over_quota {
                return Err(StartRefused::Quota { retry_after });
            }
            if streaming {
                starts.start_streaming(name)
            } else {
                starts.start(name).map(|()| StreamPermit::none())
            }
        };
        let idempotency_key = match starts_run {
            true => idempotency::key_of(&req.headers)
                .map_err(|e| Refused::new(RejectReason::Idempotency, e))?,
            false => None,
        };
        let ctl = Ctl {
            owner: name
                .filter(|_| starts_run || route == Route::Upload)
                .map(Arc::from),
            admit: starts_run.then_some(&admit as _),
            permit,
            records_file: route == Route::Upload,
            counted_to: Arc::from(name.unwrap_or(usage::OPEN_CLIENT)),
            idempotent: idempotency_key.map(|key| Idempotent {
                store: &self.idempotency,
                client: name.unwrap_or(usage::OPEN_CLIENT),
                key,
            }),
        };
        if matches!(
            route,
            Route::Info | Route::Parameters | Route::Meta | Route::Site
        ) {
            if let Some(body) = body {
                intake::discard_body(body, self.body_read_timeout).await?;
            }
            return self
                .app_meta(
                    route,
                    app,
                    path_and_query,
                    plan,
                    req,
                    rid,
                    info,
                    prefix,
                    ctl,
                )
                .await;
        }
        match body {
            Some(body) if plan.body != BodyKind::None => {
                self.pass_planned(app, path_and_query, plan, req, body, rid, info, prefix, ctl)
                    .await
            }
            body => {
                // A GET of a route that takes a body on POST: read and dropped like any GET's.
                if let Some(body) = body {
                    intake::discard_body(body, self.body_read_timeout).await?;
                }
                let none = http_body_util::Empty::<Bytes>::new();
                self.pass_planned(app, path_and_query, plan, req, none, rid, info, prefix, ctl)
                    .await
            }
        }
    }

    /// `/info`, `/parameters`, `/meta`, `/site`: one upstream request per app and
    /// `cache.app_meta_ttl`, whatever the number of clients asking.
    #[allow(clippy::too_many_arguments)]
    async fn app_meta(
        &self,
        route: Route,
        app: &Arc<App>,
        path_and_query: String,
        plan: passthrough::Plan,
        req: &Parts,
        rid: &HeaderValue,
        info: &mut RequestInfo,
        prefix: Option<&crate::rewrite::UserPrefix>,
        ctl: Ctl<'_>,
    ) -> Result<Response<Body>, Refused> {
        let max = self.passthrough.max_answer_bytes();
        let fetch = async {
            let none = http_body_util::Empty::<Bytes>::new();
            let resp = self
                .pass_planned(app, path_and_query, plan, req, none, rid, info, prefix, ctl)
                .await?;
            let (parts, body) = resp.into_parts();
            let read =
                http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max)).await;
            Ok::<_, Refused>(match read {
                Ok(b) => Kept {
                    status: parts.status,
                    headers: parts.headers,
                    body: b.to_bytes(),
                },
                Err(_) => {
                    let e = GatewayError::UpstreamProtocol.to_response();
                    let (parts, body) = e.into_parts();
                    Kept {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                    }
                }
            })
        };
        let (kept, outcome) = self.passthrough.meta().get(app.id, route, fetch).await?;
        info.cache = Some(outcome);
        let body = if req.method == http::Method::HEAD {
            Body::empty()
        } else {
            Body::Full(kept.body.clone())
        };
        let mut out = Response::new(body);
        *out.status_mut() = kept.status;
        *out.headers_mut() = kept.headers.clone();
        out.headers_mut().insert(X_CACHE.clone(), outcome.header());
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pass_planned<B>(
        &self,
        app: &Arc<App>,
        path_and_query: String,
        plan: passthrough::Plan,
        req: &Parts,
        body: B,
        rid: &HeaderValue,
        info: &mut RequestInfo,
        prefix: Option<&crate::rewrite::UserPrefix>,
        ctl: Ctl<'_>,
    ) -> Result<Response<Body>, Refused>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        let fwd = Forward {
            app,
            path_and_query,
            body: plan.body,
            follows_run: plan.follows_run,
            prefix,
            owner: ctl.owner,
            admit: ctl.admit,
            permit: ctl.permit,
            records_file: ctl.records_file,
            counted_to: ctl.counted_to,
            idempotent: ctl.idempotent,
        };
        let mut served = Served::default();
        let r = self
            .passthrough
            .serve(fwd, req, body, rid, &mut served)
            .await;
        info.upstream_status = served.upstream_status;
        info.upstream_elapsed = served.upstream_elapsed;
        match r {
            Ok(resp) => Ok(resp),
            Err(why) => match why.reason() {
                Some(reason) => Err(Refused::new(reason, why)),
                None => {
                    let e = GatewayError::from(why);
                    info.error = Some(e.as_str());
                    Ok(e.to_response().map(Body::Full))
                }
            },
        }
    }

    /// The client the request's token names; `None` in open mode.
    #[inline]
    fn authenticate(&self, req: &Parts, rid: &HeaderValue) -> Result<Option<Arc<Client>>, Refused> {
        let table = self.clients.load();
        if table.is_open() {
            return Ok(None);
        }
        let client = table.authenticate(&req.headers).map_err(|why| {
            tracing::debug!(request_id = ?rid, reason = why.as_str(), "client not let in");
            Refused::new(RejectReason::Auth, GatewayError::Unauthorized)
        })?;
        Ok(Some(client))
    }

    /// The app `client` may use: its own, or the default app in open mode.
    fn app_of(&self, client: Option<&Client>) -> &Arc<App> {
        &self.upstreams.apps()[client.map_or(0, |c| c.app)]
    }

    /// Purges one run for the named app, or for every app when `app` is `None`. `None` when
    /// no app has that name; otherwise how many entries were dropped.
    pub async fn purge_run(&self, run: RunId, app: Option<&str>) -> Option<u64> {
        let apps = self.upstreams.apps();
        let targets: Vec<&Arc<App>> = match app {
            Some(name) => {
                let found: Vec<_> = apps.iter().filter(|a| a.name == name).collect();
                if found.is_empty() {
                    return None;
                }
                found
            }
            None => apps.iter().collect(),
        };
        Some(self.run_detail.fetch().purge_run(&targets, run).await)
    }

    /// Drops every cached entry; returns how many there were.
    pub async fn purge_all(&self) -> u64 {
        self.run_detail.fetch().purge_all().await
    }

    /// Cache figures for the admin API.
    pub fn cache_report(&self) -> CacheReport {
        let s = self.cache().stats();
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
            fetches_in_flight: self.run_detail.fetch().in_flight(),
        }
    }
}

/// What a passed request's handling needs from the door: who owns what it creates, its run
/// start admission, its open-stream place.
struct Ctl<'a> {
    owner: Option<Arc<str>>,
    admit: Option<&'a (dyn Fn(bool) -> Result<StreamPermit, StartRefused> + Sync)>,
    permit: Option<StreamPermit>,
    records_file: bool,
    counted_to: Arc<str>,
    idempotent: Option<Idempotent<'a>>,
}

/// Refuses a request over `client`'s rate limit.
fn check_rate(client: &Client) -> Result<(), Refused> {
    client.check_rate().map_err(|wait| {
        let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        Refused::new(
            RejectReason::RateLimit,
            GatewayError::RateLimited { retry_after_secs },
        )
    })
}

/// The configured apps' names, in order (index = `ClientConfig::app`).
fn app_names(config: &Config) -> Vec<String> {
    config.apps.iter().map(|a| a.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    /// Every request's future is created and moved whole (into hyper's dispatcher): a large one
    /// costs a memcpy per request. The rarer routes are boxed so the run-detail path stays
    /// small (it was 23 KB with them inline: 4 µs of copying per miss).
    #[tokio::test]
    async fn a_requests_future_stays_small() {
        let c = crate::Config::for_upstream("http://127.0.0.1:1/v1", "app-k").unwrap();
        let gw = super::Gateway::new(&c).unwrap();
        let req = http::Request::new(http_body_util::Empty::<bytes::Bytes>::new());
        let size = std::mem::size_of_val(&gw.handle(req));
        assert!(size <= 4096, "Gateway::handle's future is {size} bytes");
    }
}
