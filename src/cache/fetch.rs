//! The fetch behind a miss: one per (app, run) at a time, from the shared tier when it has the
//! answer, else from the upstream; what it brings back is kept as the policy says.
//!
//! Invariant: a fetch for a key starts only when the cache has no live entry for it and no fetch
//! for it is in flight (the [`SingleFlight`] re-checks the cache under its lock); what the fetch
//! brings back is in the cache before the flight's waiters are woken. With a shared tier the
//! fetch follows its protocol (see [`crate::shared`]): get → lock → upstream → put → notify and
//! release (one script); every shared-tier failure falls back to the upstream, so Redis down is
//! not an outage; the lookup and the lock are one round trip, and the put, notification and
//! release follow the answer (the flight's waiters are woken first), so a miss costs one Redis round
//! trip more than without the tier. Purges go to both tiers. A terminal run detail fetched from
//! the upstream is counted in [`crate::usage`] and told to [`crate::webhooks`] on a task of its
//! own, after the answer.
//!
//! A run this replica (or, with the shared tier, any replica) saw start (`workflow_started`
//! passed through it) may not be written in Dify's database yet: an upstream 404 within `cache.not_found_grace` of the start is asked
//! again shortly (every [`GRACE_RETRY`]) until the grace ends, and a 404 that outlasts it is
//! answered but never kept.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::clients::Client;
use crate::error::GatewayError;
use crate::flight::{FlightLost, Role, SingleFlight};
use crate::metrics::Metrics;
use crate::ownership::{Kind, Ownership};
use crate::policy::{Decision, EntryClass, Policy};
use crate::run_id::RunId;
use crate::shared::{LockResult, Lookup, PutOutcome, SharedTier, WaitOutcome};
use crate::upstream::{App, Credentials, UpstreamAnswer, UpstreamError, Upstreams};
use crate::usage::{FinishedRun, Usage, OPEN_CLIENT};

use super::{Cache, CacheKey, KeptHeaders, Stored};

/// How often a 404 for a run seen starting is asked again within `cache.not_found_grace`.
pub const GRACE_RETRY: Duration = Duration::from_millis(250);

/// Bodies passed on (not kept) up to this size are copied out of the upstream connection's read
/// buffer (see [`Fetch::entry`]); a larger one is lent as received rather than copied.
const COPY_PASSED_BELOW: usize = 16 << 10;

/// Most runs remembered as just started, for `cache.not_found_grace`.
const MAX_RECENT_STARTS: usize = 100_000;

/// The request id of the fetch that brings a finished async run's answer into the cache.
static WARM_REQUEST_ID: HeaderValue = HeaderValue::from_static("run-finished");

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

/// What a flight yields: a fresh fetch, or an entry found without one (the re-check under the
/// flight lock found that a flight for the key had just landed, or another replica had put the
/// answer in the shared tier).
#[derive(Debug, Clone)]
pub enum FlightValue {
    Fetched(Arc<Fetched>),
    Cached(Arc<Stored>),
}

impl FlightValue {
    /// The answer it carries: the entry found, or what the fetch brought (none when it failed).
    pub fn stored(&self) -> Option<Arc<Stored>> {
        match self {
            FlightValue::Cached(s) => Some(Arc::clone(s)),
            FlightValue::Fetched(f) => f.result.as_ref().ok().cloned(),
        }
    }
}

/// The fetches behind misses, and what they fill.
pub struct Fetch {
    /// The in-process cache the fetches fill (a handle on the same stores the hit path reads).
    cache: Cache,
    /// What of an answer is kept, and for how long.
    policy: Policy,
    /// Fetches in flight, one per key.
    flights: Arc<SingleFlight<CacheKey, FlightValue>>,
    /// The Redis/Valkey tier shared with other replicas, when configured.
    shared: Option<SharedTier>,
    /// Where a run comes from when no tier has it.
    upstreams: Arc<Upstreams>,
    /// The kept headers of the last upstream answer, shared by entries whose headers match.
    last_headers: Mutex<Option<Arc<KeptHeaders>>>,
    metrics: Arc<Metrics>,
    /// Where a terminal answer fetched here is counted, and who created the run.
    meter: Option<(Arc<Usage>, Arc<Ownership>)>,
    /// Runs seen starting within `cache.not_found_grace`, and when; `None` when it is zero.
    recent_starts: Option<(quick_cache::sync::Cache<CacheKey, Instant>, Duration)>,
    /// Told of every terminal run detail fetched from the upstream (set once, after both exist).
    webhooks: std::sync::OnceLock<std::sync::Weak<crate::webhooks::Webhooks>>,
}

impl Fetch {
    pub fn new(
        cache: Cache,
        policy: Policy,
        shared: Option<SharedTier>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Fetch {
        Fetch {
            cache,
            policy,
            flights: Arc::default(),
            shared,
            upstreams,
            last_headers: Mutex::new(None),
            metrics,
            meter: None,
            recent_starts: None,
            webhooks: std::sync::OnceLock::new(),
        }
    }

    /// Tells `webhooks` of every terminal run detail fetched from the upstream from now on.
    pub fn announce_to(&self, webhooks: &Arc<crate::webhooks::Webhooks>) {
        let _ = self.webhooks.set(Arc::downgrade(webhooks));
    }

    /// Takes an upstream 404 for a run seen starting less than `grace` ago for a row not yet
    /// written (see the module's invariant); zero disables.
    pub fn with_not_found_grace(mut self, grace: Duration) -> Fetch {
        self.recent_starts = (!grace.is_zero()).then(|| {
            // Entries past their grace are ignored when read and make room when full; no
            // expiry bookkeeping on the start's path.
            let starts = quick_cache::sync::Cache::new(MAX_RECENT_STARTS);
            (starts, grace)
        });
        self
    }

    /// `run` of `app` was just seen starting: marked here and, with the shared tier, for the
    /// other replicas (off the caller's path).
    pub fn saw_start(&self, app: &App, run: RunId) {
        let Some((starts, grace)) = &self.recent_starts else {
            return;
        };
        starts.insert(CacheKey { app: app.id, run }, Instant::now());
        if let Some(shared) = self.shared.clone() {
            let (tag, grace) = (app.credentials().tag.clone(), *grace);
            tokio::spawn(async move {
                let _ = shared.mark_started(&tag, run, grace).await;
            });
        }
    }

    /// When the grace of a run seen starting (here, or by another replica) ends, if it has not
    /// yet.
    async fn grace_end(&self, key: CacheKey, creds: &Credentials) -> Option<Instant> {
        let (starts, grace) = self.recent_starts.as_ref()?;
        let now = Instant::now();
        if let Some(end) = starts.get(&key).map(|at| at + *grace) {
            return (end > now).then_some(end);
        }
        let shared = self.shared.as_ref()?;
        let left = shared.started_left(&creds.tag, key.run).await.ok()??;
        Some(now + left.min(*grace))
    }

    /// Fetches `run` of `app` now (or joins the fetch in flight), so its answer is in the cache.
    pub async fn warm(self: &Arc<Self>, app: &Arc<App>, run: RunId) {
        let _ = self.run(app, run, &WARM_REQUEST_ID, None).await;
    }

    /// Counts every terminal run this fetch brings from the upstream in `usage` (see
    /// [`crate::usage`]): to the client `ownership` says created it, else to the client whose
    /// request started the fetch ([`OPEN_CLIENT`] when the gateway runs open).
    pub fn with_usage(mut self, usage: Arc<Usage>, ownership: Arc<Ownership>) -> Fetch {
        self.meter = Some((usage, ownership));
        self
    }

    /// Joins the fetch of `run` for `app` in flight, or starts it. A fetch this request starts
    /// is charged to `leader`'s share of upstream slots and runs on this request's task; should
    /// the request go away first, the fetch goes on on a task of its own and finishes for the
    /// others ([`crate::flight`]).
    pub async fn run(
        self: &Arc<Self>,
        app: &Arc<App>,
        run: RunId,
        rid: &HeaderValue,
        leader: Option<&Arc<Client>>,
    ) -> Result<(FlightValue, Role), FlightLost> {
        let key = CacheKey { app: app.id, run };
        let me = Arc::clone(self);
        let app = Arc::clone(app);
        let rid = rid.clone();
        let leader = leader.cloned();
        self.flights
            .run(
                key,
                || self.cache.get(&key).map(FlightValue::Cached),
                move || async move {
                    let value = Arc::clone(&me)
                        .fetch(Arc::clone(&app), key, rid, leader.clone())
                        .await;
                    let told = match &value {
                        FlightValue::Fetched(f) if me.tells_of(f) => Some(Arc::clone(f)),
                        _ => None,
                    };
                    if let Some(f) = told {
                        // Counted and announced off the path: the waiters are answered now.
                        let app2 = Arc::clone(&app);
                        let counter = Arc::clone(&me);
                        tokio::spawn(async move {
                            counter.count_usage(&app2, key, leader.as_deref(), &f).await;
                            counter.announce(&app2, key, &f).await;
                        });
                    }
                    value
                },
            )
            .await
    }

    /// Is `f` an answer [`Fetch::count_usage`] or [`Fetch::announce`] acts on: a terminal run
    /// detail, with metering or webhooks on? Only then is a task spawned for them.
    fn tells_of(&self, f: &Fetched) -> bool {
        let terminal = matches!(&f.result, Ok(s) if s.class == Some(EntryClass::Terminal));
        terminal && (self.meter.is_some() || self.webhooks.get().is_some())
    }

    /// Counts a terminal run detail the upstream just gave (once per run: see
    /// [`crate::usage`]), on a task of its own: its Redis round trips are not the answer's.
    async fn count_usage(&self, app: &App, key: CacheKey, leader: Option<&Client>, f: &Fetched) {
        let Some((usage, ownership)) = &self.meter else {
            return;
        };
        let Ok(stored) = &f.result else {
            return;
        };
        if stored.status != StatusCode::OK || stored.class != Some(EntryClass::Terminal) {
            return;
        }
        let Some(detail) = FinishedRun::parse(&stored.body) else {
            return;
        };
        let owner = ownership.owner_of(key.app, Kind::Run, key.run.uuid()).await;
        let client = owner
            .as_deref()
            .or(leader.map(|c| &*c.name))
            .unwrap_or(OPEN_CLIENT);
        usage
            .finished_run(&app.name, client, &key.run.to_string(), &detail)
            .await;
    }

    /// A terminal run detail from the upstream, to the webhooks (on the task that follows the
    /// fetch, after the answer).
    async fn announce(&self, app: &Arc<App>, key: CacheKey, f: &Fetched) {
        let Some(webhooks) = self.webhooks.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Ok(stored) = &f.result else { return };
        if stored.class != Some(EntryClass::Terminal) {
            return;
        }
        webhooks.terminal_fetched(app, key.run, &stored.body).await;
    }

    /// Fetches in flight now.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// The fetch behind a flight: the shared tier first (when configured), under its
    /// fleet-wide lock the upstream, then the shared tier is filled for the other replicas.
    async fn fetch(
        self: Arc<Self>,
        app: Arc<App>,
        key: CacheKey,
        rid: HeaderValue,
        leader: Option<Arc<Client>>,
    ) -> FlightValue {
        let leader = leader.as_deref();
        // One key and its tag for the whole fetch, even if the key rotates meanwhile: an answer
        // fetched with one key is never filed under another key's tag.
        let creds = app.credentials();
        match self.shared.clone() {
            None => self.fetch_upstream(&app, &creds, key, &rid, leader).await.0,
            // Boxed: the shared tier's futures are large, and the flight's box (made for every
            // fetch) is sized for its largest branch.
            Some(shared) => {
                Box::pin(self.fetch_shared(shared, &app, &creds, key, rid, leader)).await
            }
        }
    }

    /// [`Fetch::fetch`] with the shared tier: its value, else its lock and the upstream.
    async fn fetch_shared(
        &self,
        shared: SharedTier,
        app: &App,
        creds: &Credentials,
        key: CacheKey,
        rid: HeaderValue,
        leader: Option<&Client>,
    ) -> FlightValue {
        let tag = &creds.tag;
        // One round trip: the value another replica put, else the fleet-wide fetch lock.
        let lock = match shared.get_or_lock(tag, key.run).await {
            (Lookup::Hit(stored), _) => return self.warm_from_shared(key, stored),
            // Redis is not answering: do not spend more timeouts on it.
            (Lookup::Unavailable, _) => {
                return self.fetch_upstream(app, creds, key, &rid, leader).await.0
            }
            (Lookup::Miss, lock) => lock,
        };
        match lock {
            LockResult::Acquired(token) => {
                let (value, kept) = self.fetch_upstream(app, creds, key, &rid, leader).await;
                // The waiters here are answered now; the other replicas hear of it from Redis
                // a moment later (put, notify, release off this fetch's path).
                let tag = tag.clone();
                tokio::spawn(async move {
                    let put = match kept {
                        Some(stored) => shared.put(&tag, key.run, &stored).await,
                        None => PutOutcome::NotKept,
                    };
                    let (notify, release) = shared
                        .finish(token, &tag, key.run, put == PutOutcome::Written)
                        .await;
                    tracing::debug!(
                        target: "shared", request_id = ?rid, run = %key.run, put = put.as_str(),
                        notify = notify.as_str(), release = release.as_str(),
                        "shared fetch done"
                    );
                });
                value
            }
            LockResult::Held => {
                let wait = shared.config().wait_timeout;
                let waited = shared.wait(tag, key.run, wait).await;
                if let WaitOutcome::Notified { stored: true } = waited {
                    if let Lookup::Hit(stored) = shared.get(tag, key.run).await {
                        return self.warm_from_shared(key, stored);
                    }
                }
                // The holder failed, crashed or took too long: fetch ourselves.
                tracing::debug!(
                    target: "shared", request_id = ?rid, run = %key.run, wait = waited.as_str(),
                    "shared fetch lock held elsewhere; fetching without it"
                );
                self.fetch_upstream(app, creds, key, &rid, leader).await.0
            }
            LockResult::Unavailable => self.fetch_upstream(app, creds, key, &rid, leader).await.0,
        }
    }

    /// The shared tier, when configured.
    pub(crate) fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    /// The entry the shared tier holds for `run` of `app` (put by any replica), warmed into
    /// the in-process cache; `None` without a shared tier or entry.
    pub(crate) async fn read_shared(&self, app: &App, run: RunId) -> Option<Arc<Stored>> {
        let shared = self.shared.as_ref()?;
        let key = CacheKey { app: app.id, run };
        match shared.get(&app.credentials().tag, run).await {
            Lookup::Hit(stored) => match self.warm_from_shared(key, stored) {
                FlightValue::Cached(s) => Some(s),
                FlightValue::Fetched(_) => None,
            },
            _ => None,
        }
    }

    /// An entry another replica fetched: warm the in-process cache with it.
    fn warm_from_shared(&self, key: CacheKey, stored: Arc<Stored>) -> FlightValue {
        self.metrics.shared_tier_hits.inc();
        self.cache.insert(key, Arc::clone(&stored));
        FlightValue::Cached(stored)
    }

    /// One upstream fetch, the policy's decision, the in-process cache insert. Returns the
    /// flight's value and the entry when it was kept.
    async fn fetch_upstream(
        &self,
        app: &App,
        creds: &Credentials,
        key: CacheKey,
        rid: &HeaderValue,
        leader: Option<&Client>,
    ) -> (FlightValue, Option<Arc<Stored>>) {
        let t = Instant::now();
        let share = leader.and_then(|c| c.upstream_share.as_ref());
        let mut r = self
            .upstreams
            .fetch_run(app, key.run, rid, share, creds)
            .await;
        // A run seen starting whose row Dify has not written yet: ask again within the grace.
        let mut in_grace = false;
        let mut grace_end = None;
        while let Ok(a) = &r {
            if a.status != StatusCode::NOT_FOUND {
                break;
            }
            if grace_end.is_none() {
                // Boxed: rare (a 404), and its shared-tier read would size every fetch.
                grace_end = Box::pin(self.grace_end(key, creds)).await;
            }
            let Some(end) = grace_end else {
                break;
            };
            in_grace = true;
            tokio::time::sleep(GRACE_RETRY.min(end.saturating_duration_since(Instant::now())))
                .await;
            r = self
                .upstreams
                .fetch_run(app, key.run, rid, share, creds)
                .await;
            if Instant::now() >= end {
                break;
            }
        }
        let upstream_elapsed = t.elapsed();
        let fetched = match r {
            Ok(a) => {
                let not_yet = in_grace && a.status == StatusCode::NOT_FOUND;
                let stored = if not_yet {
                    tracing::debug!(request_id = ?rid, run = %key.run, "404 for a run seen starting: not kept");
                    self.entry(a, None, None)
                } else {
                    self.keep(a, key, rid)
                };
                self.cache.insert(key, Arc::clone(&stored));
                Fetched {
                    upstream_status: Some(stored.status),
                    result: Ok(stored),
                    upstream_elapsed,
                }
            }
            Err(e) => {
                log_failure(&e, app, key, rid);
                Fetched {
                    result: Err(e.into()),
                    upstream_status: None,
                    upstream_elapsed,
                }
            }
        };
        let kept = match &fetched.result {
            Ok(s) if s.class.is_some() => Some(Arc::clone(s)),
            _ => None,
        };
        (FlightValue::Fetched(Arc::new(fetched)), kept)
    }

    /// The entry an answer makes: classed as the policy decides (or not kept), with the headers
    /// the cache keeps.
    fn keep(&self, a: UpstreamAnswer, key: CacheKey, rid: &HeaderValue) -> Arc<Stored> {
        let (class, ttl) = match self.policy.decide(a.status, &a.body) {
            Decision::Keep { class, ttl } => (Some(class), ttl),
            Decision::Pass(why) => {
                tracing::debug!(request_id = ?rid, run = %key.run, status = a.status.as_u16(), reason = why.as_str(), "answer not kept");
                (None, None)
            }
        };
        self.entry(a, class, ttl)
    }

    /// The entry of an answer classed `class` (`None`: passed on, not kept).
    fn entry(
        &self,
        a: UpstreamAnswer,
        class: Option<EntryClass>,
        ttl: Option<Duration>,
    ) -> Arc<Stored> {
        // A kept body is copied out of the connection's read buffer: as received it is a slice
        // that would keep the whole (much larger) buffer alive in the cache. A small body
        // passed on is copied too: while a slice of it lives, the connection's next read
        // cannot reuse its buffer and allocates a new one.
        let body = if class.is_some() || a.body.len() <= COPY_PASSED_BELOW {
            Bytes::copy_from_slice(&a.body)
        } else {
            a.body
        };
        Arc::new(Stored {
            status: a.status,
            headers: self.intern_headers(KeptHeaders::keep(&a.headers)),
            etag: super::etag_of(&body),
            body,
            class,
            ttl,
            fetched_at: Instant::now(),
        })
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

    /// Drops `run` of each of `apps` from both tiers; returns how many in-process entries there
    /// were, at least 1 when the shared tier held one.
    pub async fn purge_run(&self, apps: &[&Arc<App>], run: RunId) -> u64 {
        let mut n = 0;
        for a in apps {
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
        n
    }

    /// Drops the kept `running` answer of `run` for `app` (both tiers), once the gateway saw
    /// the run finish, so the next read fetches its terminal answer. A terminal entry stays in
    /// process; the shared tier's entry for the run is purged (a refetch at worst).
    pub async fn drop_running(&self, app: &Arc<App>, run: RunId) {
        let key = CacheKey { app: app.id, run };
        let running = self
            .cache
            .lookup(&key)
            .is_some_and(|f| f.stored.class == Some(EntryClass::Running));
        if running {
            self.cache.remove(&key);
        }
        if let Some(shared) = &self.shared {
            // The shared tier may keep another replica's running answer for this run.
            let _ = shared.purge(&app.tag(), run).await;
        }
    }

    /// Drops every entry of both tiers; returns how many the larger one held.
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
}

/// Logs a fetch that brought no answer.
fn log_failure(e: &UpstreamError, app: &App, key: CacheKey, rid: &HeaderValue) {
    let code = GatewayError::from(*e).as_str();
    match e {
        // Refusals of the gateway's own making are counted in metrics; logging each one would
        // flood the log exactly when the upstream is down.
        UpstreamError::CircuitOpen { .. } | UpstreamError::Overloaded => {
            tracing::debug!(request_id = ?rid, app = %app.name, run = %key.run, error = code, "upstream fetch refused");
        }
        _ => {
            tracing::warn!(request_id = ?rid, app = %app.name, run = %key.run, error = code, detail = %e, "upstream fetch failed");
        }
    }
}
