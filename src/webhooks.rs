//! Webhooks: a client's runs announced to its own URL when they end, signed, delivered at least
//! once.
//!
//! Invariant: only a client's configured `webhook_url` is ever called, with the run-detail body
//! as Dify gave it, `X-Dify-Gateway-Event: workflow_run.finished`, `X-Dify-Gateway-Timestamp`
//! and `X-Dify-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, timestamp "." body)>`; a
//! redirect is a failure, never followed. A run is announced to a client that started it
//! through the gateway or subscribed to it, once per (run, client) — claimed in Redis with the
//! shared tier, so one replica queues it — and each delivery is retried on a non-2xx answer, a
//! timeout or a connection failure, with exponential backoff from `webhooks.retry_base_delay`
//! (capped at `max_delay`, with jitter), `max_attempts` times in all. With the shared tier the
//! queue lives in Redis (a delivery leased by a replica that vanishes is due again after its
//! lease), so it survives restarts; without it, in memory, lost on restart. Every wanted run is
//! followed to its end: by the stream the gateway already reads when it has one, else through
//! the coalesced run-detail fetch once per `cache.running_ttl`, for at most
//! `upstream.run_timeout`. Everything is bounded (`webhooks.max_pending` wanted runs and queued
//! deliveries) and off every client's answer path; secrets appear in no log, error or `Debug`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::cache::fetch::{Fetch, FlightValue};
use crate::cache::{CacheKey, Stored};
use crate::clients::hex;
use crate::config::{ClientConfig, WebhookTarget, WebhooksConfig};
use crate::metrics::Metrics;
use crate::policy::EntryClass;
use crate::run_id::RunId;
use crate::shared::{unix_ms_now, SharedTier};
use crate::upstream::{crypto_provider, App};

/// The event every delivery announces.
pub const EVENT: &str = "workflow_run.finished";

/// Deliveries sent at once by one replica.
const CONCURRENCY: usize = 32;
/// How often the shared queue is looked at when nothing wakes the sender sooner.
const SHARED_POLL: Duration = Duration::from_millis(250);
/// How long an announcement stays claimed, and a queued record kept.
const CLAIM_TTL: Duration = Duration::from_secs(48 * 3600);
/// Most bytes of a receiver's answer read (and dropped).
const MAX_ANSWER: usize = 16 * 1024;
/// The request id of the fetches that follow wanted runs.
static FOLLOW_REQUEST_ID: HeaderValue = HeaderValue::from_static("webhook-follower");

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How one attempt went (the label of `dify_gateway_webhook_attempts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The receiver answered 2xx.
    Delivered,
    /// It answered something else (a redirect included).
    Status,
    /// No answer within `webhooks.timeout`.
    Timeout,
    /// The connection failed.
    Connect,
    /// The client has no webhook any more (removed by a reload): given up.
    NoTarget,
}

impl Attempt {
    pub fn as_str(self) -> &'static str {
        match self {
            Attempt::Delivered => "delivered",
            Attempt::Status => "status",
            Attempt::Timeout => "timeout",
            Attempt::Connect => "connect",
            Attempt::NoTarget => "no_target",
        }
    }
}

/// What a subscription found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// The run is running: it is followed and announced when it ends.
    Watching,
    /// The run had ended: its announcement is queued now.
    Queued,
    /// The client has no webhook.
    NoWebhook,
}

impl Subscribed {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscribed::Watching => "watching",
            Subscribed::Queued => "queued",
            Subscribed::NoWebhook => "no_webhook",
        }
    }
}

/// One delivery to make.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    id: String,
    client: String,
    run: String,
    /// Attempts made so far.
    attempts: u32,
    /// The run-detail body, as Dify gave it.
    #[serde(skip)]
    body: Bytes,
}

impl Delivery {
    /// One JSON line, then the body.
    fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Delivery> {
        let nl = memchr::memchr(b'\n', bytes)?;
        let mut d: Delivery = serde_json::from_slice(&bytes[..nl]).ok()?;
        d.body = Bytes::copy_from_slice(&bytes[nl + 1..]);
        Some(d)
    }
}

/// A run someone wants announced, on this replica.
struct Wanted {
    clients: HashSet<Arc<str>>,
    /// Woken when the gateway's own reading of the run's stream ends.
    stream_ended: Arc<Notify>,
}

/// The in-memory queue (without the shared tier, or while it is down).
#[derive(Default)]
struct LocalQueue {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    items: HashMap<u64, Delivery>,
    seq: u64,
}

/// Webhook targets, wanted runs, the delivery queue and its sender.
pub struct Webhooks {
    config: WebhooksConfig,
    targets: ArcSwap<HashMap<Arc<str>, Arc<WebhookTarget>>>,
    fetch: Arc<Fetch>,
    running_ttl: Duration,
    follow_for: Duration,
    wanted: Mutex<HashMap<CacheKey, Wanted>>,
    /// Announcements made on this replica (without the shared tier's claim).
    sent: moka::sync::Cache<(CacheKey, Arc<str>), ()>,
    queue: Mutex<LocalQueue>,
    wake: Notify,
    shared: Option<SharedTier>,
    http: HttpClient,
    user_agent: HeaderValue,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    ids: AtomicU64,
    /// Set once the sender runs (started with the gateway inside a runtime, else on first use).
    sender: std::sync::OnceLock<()>,
}

impl Webhooks {
    pub fn new(
        config: &WebhooksConfig,
        clients: &[ClientConfig],
        fetch: Arc<Fetch>,
        running_ttl: Duration,
        run_timeout: Duration,
        shared: Option<SharedTier>,
        metrics: Arc<Metrics>,
    ) -> Arc<Webhooks> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match tls {
            Ok(tls) => builder.with_tls_config(tls),
            // The ring provider supports the safe defaults; this is unreachable in practice.
            Err(_) => builder.with_webpki_roots(),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let w = Arc::new(Webhooks {
            config: config.clone(),
            targets: ArcSwap::from_pointee(targets_of(clients)),
            fetch,
            running_ttl: running_ttl.max(Duration::from_millis(100)),
            follow_for: run_timeout + Duration::from_secs(60),
            wanted: Mutex::default(),
            sent: moka::sync::Cache::builder()
                .max_capacity(config.max_pending as u64)
                .time_to_live(CLAIM_TTL)
                .build(),
            queue: Mutex::default(),
            wake: Notify::new(),
            shared,
            http,
            user_agent: HeaderValue::from_static(concat!(
                "dify-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            metrics,
            stop: watch::channel(false).0,
            ids: AtomicU64::new(0),
            sender: std::sync::OnceLock::new(),
        });
        // Deliveries left queued in Redis by an earlier run are made from the start.
        if tokio::runtime::Handle::try_current().is_ok() {
            w.ensure_sender();
        }
        w
    }

    /// Starts the sender if it does not run yet (needs a runtime).
    fn ensure_sender(self: &Arc<Self>) {
        self.sender.get_or_init(|| {
            tokio::spawn(Arc::clone(self).send_loop());
        });
    }

    /// The clients' webhooks after a reload (a removed one gives up its queued deliveries).
    pub fn reload(&self, clients: &[ClientConfig]) {
        self.targets.store(Arc::new(targets_of(clients)));
    }

    /// Stops the sender (queued deliveries stay in Redis with the shared tier).
    pub fn shut_down(&self) {
        self.stop.send_replace(true);
    }

    /// Does `client` have a webhook?
    pub fn has_target(&self, client: &str) -> bool {
        self.targets.load().contains_key(client)
    }

    /// `client` started `run` through the gateway, which reads its stream (or blocking answer):
    /// announce its end if the client has a webhook. Call [`Webhooks::stream_ended`] when that
    /// reading ends.
    pub fn started(self: &Arc<Self>, app: &Arc<App>, run: RunId, client: &str) {
        if self.has_target(client) {
            self.want(app, run, client, true);
        }
    }

    /// The gateway's reading of `run`'s stream ended (finished or not): its follower looks at
    /// the run now.
    pub fn stream_ended(&self, app: &App, run: RunId) {
        let key = CacheKey { app: app.id, run };
        let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = wanted.get(&key) {
            w.stream_ended.notify_one();
        }
    }

    /// `client` asks to hear of `run`'s end; `current` is the run's answer now (the caller
    /// fetched it and the client may read it).
    pub async fn subscribe(
        self: &Arc<Self>,
        app: &Arc<App>,
        run: RunId,
        client: &str,
        current: &Stored,
    ) -> Subscribed {
        if !self.has_target(client) {
            return Subscribed::NoWebhook;
        }
        if current.class == Some(EntryClass::Terminal) {
            self.announce(app, run, client, current.body.clone()).await;
            return Subscribed::Queued;
        }
        self.want(app, run, client, false);
        Subscribed::Watching
    }

    /// A terminal run detail was fetched from the upstream (on any replica): announce it to
    /// whoever wants it, per the shared tier.
    pub async fn terminal_fetched(self: &Arc<Self>, app: &Arc<App>, run: RunId, body: &Bytes) {
        let Some(shared) = &self.shared else { return };
        let Ok(clients) = shared.webhook_wanted(&app.credentials().tag, run).await else {
            return;
        };
        for c in clients {
            if self.has_target(&c) {
                self.announce(app, run, &c, body.clone()).await;
            }
        }
    }

    /// Records the wish and makes sure a follower watches the run.
    fn want(self: &Arc<Self>, app: &Arc<App>, run: RunId, client: &str, streamed: bool) {
        let key = CacheKey { app: app.id, run };
        let client: Arc<str> = Arc::from(client);
        let spawn = {
            let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(w) = wanted.get_mut(&key) {
                w.clients.insert(Arc::clone(&client));
                None
            } else if wanted.len() >= self.config.max_pending {
                tracing::warn!(target: "webhooks", run = %run, "webhooks.max_pending runs are followed already; this run's end will not be announced");
                self.metrics
                    .webhook_deliveries
                    .get_or_create(&crate::metrics::OutcomeLabel { outcome: "dropped" })
                    .inc();
                return;
            } else {
                let stream_ended = Arc::new(Notify::new());
                wanted.insert(
                    key,
                    Wanted {
                        clients: HashSet::from([Arc::clone(&client)]),
                        stream_ended: Arc::clone(&stream_ended),
                    },
                );
                Some(stream_ended)
            }
        };
        if let Some(shared) = self.shared.clone() {
            let (tag, ttl, c) = (app.credentials().tag.clone(), self.follow_for, client);
            tokio::spawn(async move {
                let _ = shared.want_webhook(&tag, run, &c, ttl).await;
            });
        }
        self.ensure_sender();
        if let Some(stream_ended) = spawn {
            let me = Arc::clone(self);
            let app = Arc::clone(app);
            tokio::spawn(async move { me.follow(app, run, stream_ended, streamed).await });
        }
    }

    /// Follows one wanted run to its end, then announces it to everyone who wanted it.
    async fn follow(
        self: Arc<Self>,
        app: Arc<App>,
        run: RunId,
        stream_ended: Arc<Notify>,
        mut streamed: bool,
    ) {
        let key = CacheKey { app: app.id, run };
        let deadline = Instant::now() + self.follow_for;
        let mut stop = self.stop.subscribe();
        let mut body = None;
        loop {
            // While the gateway reads the run's stream, it says when the run ends; else the run
            // is looked at once per TTL.
            let wait = if streamed {
                deadline
            } else {
                (Instant::now() + self.running_ttl).min(deadline)
            };
            tokio::select! {
                _ = stream_ended.notified() => streamed = false,
                _ = tokio::time::sleep_until(wait) => {}
                _ = stop.changed() => break,
            }
            if Instant::now() >= deadline {
                break;
            }
            let got = match self.fetch.run(&app, run, &FOLLOW_REQUEST_ID, None).await {
                Ok((FlightValue::Cached(s), _)) => Some(s),
                Ok((FlightValue::Fetched(f), _)) => f.result.as_ref().ok().cloned(),
                Err(_) => None,
            };
            match got {
                Some(s) if s.class == Some(EntryClass::Terminal) => {
                    body = Some(s.body.clone());
                    break;
                }
                // Not found past the grace: nothing will end.
                Some(s) if s.status == StatusCode::NOT_FOUND && s.class.is_some() => break,
                _ => {}
            }
        }
        let clients = {
            let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            wanted.remove(&key).map(|w| w.clients).unwrap_or_default()
        };
        let Some(body) = body else {
            tracing::info!(target: "webhooks", run = %run, "a wanted run did not end while followed; not announced");
            return;
        };
        for c in clients {
            self.announce(&app, run, &c, body.clone()).await;
        }
    }

    /// Queues the announcement of `run`'s end to `client`, once (per replica, and fleet-wide
    /// with the shared tier).
    async fn announce(self: &Arc<Self>, app: &App, run: RunId, client: &str, body: Bytes) {
        self.ensure_sender();
        let key = (CacheKey { app: app.id, run }, Arc::<str>::from(client));
        if self.sent.contains_key(&key) {
            return;
        }
        self.sent.insert(key, ());
        let tag = app.credentials().tag.clone();
        let delivery = Delivery {
            id: format!(
                "{}-{}",
                uuid::Uuid::new_v4().simple(),
                self.ids.fetch_add(1, Ordering::Relaxed)
            ),
            client: client.to_owned(),
            run: run.to_string(),
            attempts: 0,
            body,
        };
        if let Some(shared) = &self.shared {
            match shared.claim_webhook(&tag, run, client, CLAIM_TTL).await {
                Ok(false) => return,
                Ok(true) => {
                    let queued = shared
                        .queue_webhook(&delivery.id, &delivery.encode(), unix_ms_now(), CLAIM_TTL)
                        .await;
                    if queued.is_ok() {
                        self.wake.notify_one();
                        return;
                    }
                }
                Err(_) => {}
            }
            tracing::warn!(target: "webhooks", run = %run, client, "shared tier unavailable: the announcement is queued on this replica only");
        }
        self.queue_locally(delivery, Instant::now());
    }

    fn queue_locally(&self, d: Delivery, due: Instant) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.items.len() >= self.config.max_pending {
            tracing::warn!(target: "webhooks", run = %d.run, client = %d.client, "webhooks.max_pending deliveries are queued already; this one is dropped");
            self.metrics
                .webhook_deliveries
                .get_or_create(&crate::metrics::OutcomeLabel { outcome: "dropped" })
                .inc();
            return;
        }
        q.seq += 1;
        let seq = q.seq;
        q.due.push(Reverse((due, seq)));
        q.items.insert(seq, d);
        drop(q);
        self.wake.notify_one();
    }

    /// Delivers what is due, until shutdown.
    async fn send_loop(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let mut next = Instant::now() + SHARED_POLL * 4;
            // The local queue.
            loop {
                let d = {
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    match q.due.peek().map(|Reverse(e)| *e) {
                        Some((due, seq)) if due <= Instant::now() => {
                            q.due.pop();
                            q.items.remove(&seq)
                        }
                        Some((due, _)) => {
                            next = next.min(due);
                            break;
                        }
                        None => break,
                    }
                };
                if let Some(d) = d {
                    self.spawn_send(&slots, d, None).await;
                }
            }
            // The shared queue.
            if let Some(shared) = &self.shared {
                next = next.min(Instant::now() + SHARED_POLL);
                let free = slots.available_permits();
                if free > 0 {
                    let now = unix_ms_now();
                    let lease = now
                        + (self.config.timeout * 2 + Duration::from_secs(30)).as_millis() as u64;
                    if let Ok(items) = shared.take_due_webhooks(now, lease, free).await {
                        for (id, record) in items {
                            match record.as_deref().and_then(Delivery::decode) {
                                Some(d) => self.spawn_send(&slots, d, Some(id)).await,
                                None => {
                                    let _ = shared.drop_webhook(&id).await;
                                }
                            }
                        }
                    }
                    if let Ok(n) = shared.webhook_queue_len().await {
                        self.metrics.webhook_queue.set(n as i64);
                    }
                }
            } else {
                let n = self
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .items
                    .len();
                self.metrics.webhook_queue.set(n as i64);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn spawn_send(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        d: Delivery,
        shared_id: Option<String>,
    ) {
        let Ok(permit) = Arc::clone(slots).acquire_owned().await else {
            return;
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _permit = permit;
            me.attempt(d, shared_id).await;
        });
    }

    /// One attempt of `d`, then its fate: done, retried later, or given up.
    async fn attempt(&self, mut d: Delivery, shared_id: Option<String>) {
        let target = self.targets.load().get(d.client.as_str()).cloned();
        let outcome = match &target {
            None => Attempt::NoTarget,
            Some(t) => self.post(t, &d).await,
        };
        d.attempts += 1;
        self.metrics
            .webhook_attempts
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        let done = match outcome {
            Attempt::Delivered => Some("delivered"),
            Attempt::NoTarget => Some("failed"),
            _ if d.attempts >= self.config.max_attempts => Some("failed"),
            _ => None,
        };
        if let Some(result) = done {
            self.metrics
                .webhook_deliveries
                .get_or_create(&crate::metrics::OutcomeLabel { outcome: result })
                .inc();
            if result == "failed" {
                tracing::warn!(target: "webhooks", run = %d.run, client = %d.client, attempts = d.attempts, last = outcome.as_str(), "webhook delivery given up");
            }
            if let (Some(id), Some(shared)) = (&shared_id, &self.shared) {
                let _ = shared.drop_webhook(id).await;
            }
            return;
        }
        let delay = self.backoff(d.attempts);
        tracing::debug!(target: "webhooks", run = %d.run, client = %d.client, attempt = d.attempts, outcome = outcome.as_str(), retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; retrying");
        if let (Some(id), Some(shared)) = (&shared_id, &self.shared) {
            let due = unix_ms_now() + delay.as_millis() as u64;
            if shared
                .queue_webhook(id, &d.encode(), due, CLAIM_TTL)
                .await
                .is_ok()
            {
                return;
            }
        }
        self.queue_locally(d, Instant::now() + delay);
    }

    /// The wait before the retry after `attempts` attempts: doubling from the base, capped,
    /// with up to a quarter more of jitter.
    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.config.retry_base_delay;
        let exp = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let capped = exp.min(self.config.max_delay);
        let jitter = capped.mul_f64(fastrand_unit() * 0.25);
        capped + jitter
    }

    /// Posts `d` to `t`: one attempt, bounded by `webhooks.timeout`.
    async fn post(&self, t: &WebhookTarget, d: &Delivery) -> Attempt {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        let signature = sign(t.secret.expose_secret().as_bytes(), &timestamp, &d.body);
        let req = Request::post(t.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, self.user_agent.clone())
            .header("x-dify-gateway-event", EVENT)
            .header("x-dify-gateway-timestamp", &timestamp)
            .header("x-dify-gateway-signature", format!("sha256={signature}"))
            .header("x-dify-gateway-delivery", &d.id)
            .body(Full::new(d.body.clone()));
        let Ok(req) = req else {
            return Attempt::Connect;
        };
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|_| Attempt::Connect)?;
            let status = resp.status();
            // Read (a little of) the answer so the connection can be reused; its bytes are
            // not kept.
            let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
            Ok::<_, Attempt>(status)
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Err(_) => Attempt::Timeout,
            Ok(Err(a)) => a,
            Ok(Ok(s)) if s.is_success() => Attempt::Delivered,
            Ok(Ok(_)) => Attempt::Status,
        }
    }
}

/// The clients with a webhook, by name.
fn targets_of(clients: &[ClientConfig]) -> HashMap<Arc<str>, Arc<WebhookTarget>> {
    clients
        .iter()
        .filter_map(|c| Some((Arc::from(c.name.as_str()), Arc::new(c.webhook.clone()?))))
        .collect()
}

/// Hex of HMAC-SHA256(`secret`, `timestamp` "." `body`): the `X-Dify-Gateway-Signature` value
/// after `sha256=`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// A number in [0, 1) from the OS generator (for jitter).
fn fastrand_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_one_computed_elsewhere() {
        // Python: hmac.new(b"0123456789abcdef", b'1700000000.{"id":"r"}', hashlib.sha256)
        let s = sign(b"0123456789abcdef", "1700000000", b"{\"id\":\"r\"}");
        assert_eq!(
            s,
            "edae8bcff1145b61890b41cbd65dd9fc49cc0a3e4cb46b610a959f6355da2b59"
        );
        assert_ne!(
            sign(b"another-secret-123", "1700000000", b"{\"id\":\"r\"}"),
            s
        );
    }

    #[test]
    fn deliveries_survive_their_encoding() {
        let d = Delivery {
            id: "a-1".into(),
            client: "team-a".into(),
            run: "r".into(),
            attempts: 3,
            body: Bytes::from_static(b"{\"x\":\"line\\n\"}\n"),
        };
        let back = Delivery::decode(&d.encode()).unwrap();
        assert_eq!(
            (back.id, back.client, back.run, back.attempts),
            ("a-1".into(), "team-a".into(), "r".into(), 3)
        );
        assert_eq!(back.body, d.body);
        assert!(Delivery::decode(b"nonsense").is_none());
    }
}
