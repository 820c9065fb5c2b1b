//! Deliveries: queued (in Redis with the shared tier, else in memory), signed, posted to the
//! client's URL alone, retried with backoff.
//!
//! Invariant: a delivery is taken by one sender at a time (a lease in Redis, or removal from
//! the local queue) and ends in exactly one of: delivered (2xx), re-queued with a later due
//! time, given up after `webhooks.max_attempts`, or handed back at shutdown; the secret is used
//! to sign and nowhere else.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Attempt, Webhooks, EVENT};
use crate::clients::hex;
use crate::config::{WebhookTarget, WebhooksConfig};
use crate::metrics::OutcomeLabel;
use crate::shared::unix_ms_now;
use crate::upstream::{crypto_provider, jitter};

/// Deliveries sent at once by one replica.
const CONCURRENCY: usize = 32;
/// How often the shared queue is looked at when nothing wakes the sender sooner.
const SHARED_POLL: Duration = Duration::from_millis(250);
/// Most bytes of a receiver's answer read (and dropped).
const MAX_ANSWER: usize = 16 * 1024;

pub(super) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client that posts deliveries: HTTP/1.1 over rustls (the process's one crypto provider),
/// connecting within `timeout`; it follows no redirect (hyper's client never does).
pub(super) fn http_client(timeout: Duration) -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match tls {
        Ok(tls) => builder.with_tls_config(tls),
        // The ring provider supports the safe defaults; this is unreachable in practice.
        Err(_) => builder.with_webpki_roots(),
    }
    .https_or_http()
    .enable_http1()
    .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// One delivery to make.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Delivery {
    pub(super) id: String,
    pub(super) client: String,
    pub(super) run: String,
    /// Attempts made so far.
    pub(super) attempts: u32,
    /// The run-detail body, as Dify gave it.
    #[serde(skip)]
    pub(super) body: Bytes,
}

impl Delivery {
    /// One JSON line, then the body.
    pub(super) fn encode(&self) -> Vec<u8> {
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

/// The in-memory queue (without the shared tier, or while it is down).
#[derive(Default)]
pub(super) struct LocalQueue {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    items: HashMap<u64, Delivery>,
    seq: u64,
}

impl LocalQueue {
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}

impl Webhooks {
    /// Queues `d` on this replica, due at `due`; false when `webhooks.max_pending` are queued.
    pub(super) fn queue_locally(&self, d: Delivery, due: Instant) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.items.len() >= self.config.max_pending {
            drop(q);
            tracing::warn!(target: "webhooks", run = %d.run, client = %d.client, "webhooks.max_pending deliveries are queued already; this one is dropped");
            self.count_delivery("dropped");
            return false;
        }
        q.seq += 1;
        let seq = q.seq;
        q.due.push(Reverse((due, seq)));
        q.items.insert(seq, d);
        drop(q);
        self.wake.notify_one();
        true
    }

    /// A new delivery's id: unique across replicas and restarts.
    pub(super) fn delivery_id(&self) -> String {
        format!(
            "{}-{}",
            uuid::Uuid::new_v4().simple(),
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(super) fn count_delivery(&self, outcome: &'static str) {
        self.metrics
            .webhook_deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Delivers what is due, until shutdown.
    pub(super) async fn send_loop(self: Arc<Self>) {
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
                    let lease = now + self.delivery_lease().as_millis() as u64;
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

    /// How long a replica holds a delivery it took from Redis: past it, another may take it.
    fn delivery_lease(&self) -> Duration {
        self.config.timeout * 2 + Duration::from_secs(30)
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
        if let Some(id) = &shared_id {
            self.leased
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.clone());
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _permit = permit;
            let mut stop = me.stop.subscribe();
            tokio::select! {
                _ = me.attempt(d, shared_id.as_deref()) => {}
                // Shutdown: the attempt is cut; its lease is handed back by `release`.
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Some(id) = &shared_id {
                me.leased
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
            }
        });
    }

    /// One attempt of `d`, then its fate: done, retried later, or given up.
    async fn attempt(&self, mut d: Delivery, shared_id: Option<&str>) {
        let target = self.targets.load().get(d.client.as_str()).cloned();
        let outcome = match &target {
            None => Attempt::NoTarget,
            Some(t) => self.post(t, &d).await,
        };
        d.attempts += 1;
        self.metrics
            .webhook_attempts
            .get_or_create(&OutcomeLabel {
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
            self.count_delivery(result);
            if result == "failed" {
                tracing::warn!(target: "webhooks", run = %d.run, client = %d.client, attempts = d.attempts, last = outcome.as_str(), "webhook delivery given up");
            }
            if let (Some(id), Some(shared)) = (shared_id, &self.shared) {
                let _ = shared.drop_webhook(id).await;
            }
            return;
        }
        let delay = backoff(&self.config, d.attempts, jitter());
        tracing::debug!(target: "webhooks", run = %d.run, client = %d.client, attempt = d.attempts, outcome = outcome.as_str(), retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; retrying");
        if let (Some(id), Some(shared)) = (shared_id, &self.shared) {
            let due = unix_ms_now() + delay.as_millis() as u64;
            let record = d.encode();
            if shared
                .requeue_webhook(id, &record, due, super::CLAIM_TTL)
                .await
                .is_ok()
            {
                return;
            }
        }
        self.queue_locally(d, Instant::now() + delay);
    }

    /// Posts `d` to `t`: one attempt, bounded by `webhooks.timeout`.
    async fn post(&self, t: &WebhookTarget, d: &Delivery) -> Attempt {
        let timestamp = (unix_ms_now() / 1000).to_string();
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

    /// Shutdown: the deliveries this replica took from Redis are due again now (for the
    /// replicas that go on, or the next start); the ones queued in memory are lost (logged).
    pub(super) async fn release_deliveries(&self) {
        let ids: Vec<String> = self
            .leased
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        if let Some(shared) = &self.shared {
            let _ = shared.release_webhooks(&ids, unix_ms_now()).await;
        }
        let lost = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if lost > 0 {
            tracing::warn!(target: "webhooks", deliveries = lost, "webhook deliveries queued in memory are lost at shutdown");
        }
    }
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

/// The wait before the retry after `attempts` attempts: doubling from the base, capped at
/// `max_delay`, plus `jitter` (in [0, 1)) of a quarter more.
fn backoff(config: &WebhooksConfig, attempts: u32, jitter: f64) -> Duration {
    let exp = config
        .retry_base_delay
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let capped = exp.min(config.max_delay);
    capped + capped.mul_f64(jitter * 0.25)
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
    fn retries_wait_longer_each_time_up_to_the_cap() {
        let config = WebhooksConfig {
            retry_base_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
            ..WebhooksConfig::default()
        };
        let waits: Vec<u64> = (1..=6)
            .map(|n| backoff(&config, n, 0.0).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        // Jitter adds at most a quarter, never less than the plain wait.
        assert_eq!(backoff(&config, 2, 0.999_999).as_millis(), 12_499);
        assert_eq!(backoff(&config, 40, 0.0), Duration::from_secs(60));
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
