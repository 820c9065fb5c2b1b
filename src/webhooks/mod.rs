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
//! wishes, the followed runs and the queue live in Redis under leases, so a replica that
//! vanishes leaves its work to the others and a restart loses nothing; without it they are in
//! memory, lost on restart. Every wanted run is followed to its end ([`follow`]). Everything is
//! bounded (`webhooks.max_pending` followed runs per replica and queued deliveries) and off
//! every client's answer path except the subscription's own; secrets appear in no log, error or
//! `Debug`.

mod deliver;
mod follow;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::cache::fetch::Fetch;
use crate::cache::{CacheKey, Stored};
use crate::config::{ClientConfig, Config, WebhookTarget, WebhooksConfig};
use crate::metrics::Metrics;
use crate::policy::EntryClass;
use crate::run_id::RunId;
use crate::shared::{unix_ms_now, Announced, NewDelivery, SharedTier};
use crate::upstream::App;

pub use deliver::sign;

/// The event every delivery announces.
pub const EVENT: &str = "workflow_run.finished";

/// How long an announcement stays claimed, and a queued record kept.
const CLAIM_TTL: Duration = Duration::from_secs(48 * 3600);

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

/// What a subscription did (the `subscription` field of its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// The run is running: it is followed and announced when it ends.
    Watching,
    /// The run had ended: its announcement is queued now.
    Queued,
    /// The run had ended and its end was announced to this client already.
    AlreadyAnnounced,
    /// Over `webhooks.max_pending`: not taken.
    Dropped,
    /// The client has no webhook.
    NoWebhook,
}

impl Subscribed {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscribed::Watching => "watching",
            Subscribed::Queued => "queued",
            Subscribed::AlreadyAnnounced => "already_announced",
            Subscribed::Dropped => "dropped",
            Subscribed::NoWebhook => "no_webhook",
        }
    }
}

/// Webhook targets, wanted runs, the delivery queue and its sender.
pub struct Webhooks {
    config: WebhooksConfig,
    targets: ArcSwap<HashMap<Arc<str>, Arc<WebhookTarget>>>,
    /// The apps served, to adopt a run named by its app tag.
    apps: Vec<Arc<App>>,
    fetch: Arc<Fetch>,
    running_ttl: Duration,
    /// How long a wish lasts: `upstream.run_timeout` plus a minute.
    follow_for: Duration,
    wanted: Mutex<HashMap<CacheKey, follow::Wanted>>,
    /// Announcements made on this replica (the shared tier's claim is the fleet-wide one).
    sent: moka::sync::Cache<(CacheKey, Arc<str>), ()>,
    queue: Mutex<deliver::LocalQueue>,
    /// Deliveries taken from Redis and being attempted here (handed back at shutdown).
    leased: Mutex<HashSet<String>>,
    wake: Notify,
    shared: Option<SharedTier>,
    http: deliver::HttpClient,
    user_agent: HeaderValue,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    ids: AtomicU64,
    /// Set once the sender (and, with the shared tier, the lease loop) runs: started with the
    /// gateway inside a runtime, else on first use.
    background: std::sync::OnceLock<()>,
}

impl Webhooks {
    pub fn new(
        config: &Config,
        apps: &[Arc<App>],
        fetch: Arc<Fetch>,
        shared: Option<SharedTier>,
        metrics: Arc<Metrics>,
    ) -> Arc<Webhooks> {
        let settings = &config.webhooks;
        let w = Arc::new(Webhooks {
            config: settings.clone(),
            targets: ArcSwap::from_pointee(targets_of(&config.clients)),
            apps: apps.to_vec(),
            fetch,
            running_ttl: config.cache.running_ttl.max(Duration::from_millis(100)),
            follow_for: config.upstream.run_timeout + Duration::from_secs(60),
            wanted: Mutex::default(),
            sent: moka::sync::Cache::builder()
                .max_capacity(settings.max_pending as u64)
                .time_to_live(CLAIM_TTL)
                .build(),
            queue: Mutex::default(),
            leased: Mutex::default(),
            wake: Notify::new(),
            shared,
            http: deliver::http_client(settings.timeout),
            user_agent: HeaderValue::from_static(concat!(
                "dify-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            metrics,
            stop: watch::channel(false).0,
            ids: AtomicU64::new(0),
            background: std::sync::OnceLock::new(),
        });
        // Deliveries and followed runs left in Redis by an earlier run are taken up from the
        // start.
        if tokio::runtime::Handle::try_current().is_ok() {
            w.start_background();
        }
        w
    }

    /// Starts the sender and the lease loop if they do not run yet (needs a runtime).
    fn start_background(self: &Arc<Self>) {
        self.background.get_or_init(|| {
            tokio::spawn(Arc::clone(self).send_loop());
            if let Some(shared) = self.shared.clone() {
                tokio::spawn(Arc::clone(self).lease_loop(shared));
            }
        });
    }

    /// The clients' webhooks after a reload (a removed one gives up its queued deliveries).
    pub fn reload(&self, clients: &[ClientConfig]) {
        self.targets.store(Arc::new(targets_of(clients)));
    }

    /// Stops the followers and the sender; with the shared tier the runs followed and the
    /// deliveries attempted here are handed back at once, for the replicas that go on or the
    /// next start. Bounded by two shared-tier calls.
    pub async fn shut_down(&self) {
        self.stop.send_replace(true);
        self.release_follows().await;
        self.release_deliveries().await;
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
            return self.announce(app, run, client, current.body.clone()).await;
        }
        if self.want(app, run, client, false) {
            Subscribed::Watching
        } else {
            Subscribed::Dropped
        }
    }

    /// A terminal run detail was fetched from the upstream (on any replica): announce it to
    /// whoever wants it, per the shared tier.
    pub async fn terminal_fetched(self: &Arc<Self>, app: &Arc<App>, run: RunId, body: &Bytes) {
        let Some(shared) = &self.shared else { return };
        let Ok((clients, _)) = shared.webhook_wanted(&app.tag(), run).await else {
            return;
        };
        for c in clients {
            if self.has_target(&c) {
                self.announce(app, run, &c, body.clone()).await;
            }
        }
    }

    /// Queues the announcement of `run`'s end to `client`, once (per replica, and fleet-wide
    /// with the shared tier).
    async fn announce(
        self: &Arc<Self>,
        app: &App,
        run: RunId,
        client: &str,
        body: Bytes,
    ) -> Subscribed {
        self.start_background();
        let key = (CacheKey { app: app.id, run }, Arc::<str>::from(client));
        // Marked (atomically) before the outcome so a concurrent subscription does not queue it
        // twice; unmarked when it is dropped, so a later one may try again.
        if !self.sent.entry(key.clone()).or_insert(()).is_fresh() {
            return Subscribed::AlreadyAnnounced;
        }
        let delivery = deliver::Delivery {
            id: self.delivery_id(),
            client: client.to_owned(),
            run: run.to_string(),
            attempts: 0,
            body,
        };
        if let Some(shared) = &self.shared {
            let tag = app.tag();
            let record = delivery.encode();
            let new = NewDelivery {
                app_tag: &tag,
                run,
                client,
                id: &delivery.id,
                record: &record,
                keep: CLAIM_TTL,
                max: self.config.max_pending,
            };
            match shared.claim_and_queue_webhook(&new, unix_ms_now()).await {
                Ok(Announced::Queued) => {
                    self.wake.notify_one();
                    return Subscribed::Queued;
                }
                Ok(Announced::Claimed) => return Subscribed::AlreadyAnnounced,
                Ok(Announced::Full) => {
                    tracing::warn!(target: "webhooks", run = %run, client, "webhooks.max_pending deliveries are queued already; this one is dropped");
                    self.count_delivery("dropped");
                    self.sent.invalidate(&key);
                    return Subscribed::Dropped;
                }
                Err(_) => {
                    tracing::warn!(target: "webhooks", run = %run, client, "shared tier unavailable: the announcement is queued on this replica only");
                }
            }
        }
        if self.queue_locally(delivery, Instant::now()) {
            Subscribed::Queued
        } else {
            self.sent.invalidate(&key);
            Subscribed::Dropped
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
