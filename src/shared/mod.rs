//! The shared tier: answers kept in Redis/Valkey so a fleet of gateways fetches each run from
//! Dify about once, with a fleet-wide fetch lock and completion notifications.
//!
//! Invariant: Redis being down, slow or holding garbage is never an outage — every call is
//! bounded by `shared.timeout`, and every failure is counted and answered as a miss or
//! `Unavailable`, after which the caller carries on with its local cache and its own fetch. A
//! value is only ever returned for the (app tag, run) it was written for, checksum intact.
//!
//! How a request handler uses it:
//!
//! ```text
//! get ─ Hit ─────────────────────────────▶ answer
//!     ─ Unavailable ─────────────────────▶ fetch locally
//!     ─ Miss ─ try_lock ─ Acquired(t) ───▶ fetch; put; finish(t) (publish + unlock, one call)
//!                       ─ Held ─ wait ─ Notified{stored:true} ─▶ get again
//!                                     ─ anything else ─────────▶ fetch locally
//!                       ─ Unavailable ───▶ fetch locally
//! ```

mod codec;
mod conn;
mod errors;
mod idempotency;
mod keys;
mod lock;
mod notify;
mod outcome;
mod owners;
mod starts;
mod usage;
mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use redis::Value;
use tokio::task::JoinHandle;

use crate::cache::Stored;
use crate::config::SharedConfig;
use crate::metrics::ReasonLabel;
use crate::run_id::RunId;

pub use codec::{decode, decode_at, encode, unix_ms_now, DecodeError, EncodeError};
pub use conn::SharedConfigError;
pub use errors::{SharedError, SharedStats};
pub(crate) use idempotency::Claim;
pub use keys::{valid_app_tag, MAX_APP_TAG};
pub use lock::{LockResult, LockToken, ReleaseOutcome};
pub use outcome::{Lookup, NotifyOutcome, PutOutcome, WaitOutcome};
pub(crate) use usage::Increments;
pub(crate) use webhooks::{follow_member, Announced, NewDelivery};

use conn::Conn;
use errors::Health;
/// Completions of one run's fetches, fleet-wide (see [`SharedTier::completions`]).
pub(crate) use notify::Waiter as Completions;
use notify::{Registry, Signal};

/// Keys asked for per SCAN step of `purge_all`, and so the most unlinked per call.
const PURGE_BATCH: usize = 500;
/// Transfer rate a write is granted beyond `shared.timeout` (about 1 Gbit/s), so a
/// multi-megabyte body is not cut off by a timeout meant for latency.
const PUT_BYTES_PER_SEC: u64 = 128 * 1024 * 1024;

/// A call that failed and was already counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable;

/// A handle on the shared tier. Cheap to clone (one `Arc`); all clones share the connections,
/// the subscriber and the counters, which stop when the last clone is dropped.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

struct Inner {
    /// Validated settings.
    config: SharedConfig,
    /// The command connection.
    conn: Conn,
    /// Failure counters and the warning limiter (shared with the subscriber task).
    health: Arc<Health>,
    /// Local waiters and the subscription state (shared with the subscriber task).
    registry: Arc<Registry>,
    /// `{prefix}v1:done`.
    channel: String,
    /// The subscriber task; aborted on drop.
    subscriber: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("config", &self.inner.config)
            .field("subscribed", &self.subscribed())
            .finish_non_exhaustive()
    }
}

impl SharedTier {
    /// Sets up the tier without waiting for Redis: connections are made in the background and
    /// re-made whenever they break, so this succeeds with Redis down. Fails only on URLs the
    /// client cannot use (validation already refuses them).
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the subscriber task).
    pub fn new(config: SharedConfig) -> Result<SharedTier, SharedConfigError> {
        SharedTier::counted(config, &Family::default())
    }

    /// [`SharedTier::new`], counting each failed call in `errors` (by `reason`) as it fails.
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the subscriber task).
    pub fn counted(
        config: SharedConfig,
        errors: &Family<ReasonLabel, Counter>,
    ) -> Result<SharedTier, SharedConfigError> {
        let conn = Conn::open(&config)?;
        let clients = conn::pubsub_clients(&config)?;
        let health = Arc::new(Health::exported_to(errors.clone()));
        let registry = Arc::new(Registry::default());
        let channel = keys::done_channel(&config.key_prefix);
        let subscriber = tokio::spawn(notify::subscribe_forever(
            Arc::clone(&registry),
            Arc::clone(&health),
            clients,
            channel.clone(),
            config.connect_timeout,
        ));
        let tier = SharedTier {
            inner: Arc::new(Inner {
                config,
                conn,
                health,
                registry,
                channel,
                subscriber,
            }),
        };
        // Start connecting now rather than on the first request. The task holds only the
        // connection handle, so it never keeps a dropped tier alive.
        let mut warm = tier.inner.conn.clone();
        tokio::spawn(async move {
            let _ = redis::cmd("PING").query_async::<Value>(&mut warm).await;
        });
        Ok(tier)
    }

    /// The settings in force.
    pub fn config(&self) -> &SharedConfig {
        &self.inner.config
    }

    /// Failure counters so far.
    pub fn stats(&self) -> SharedStats {
        self.inner.health.stats()
    }

    /// Is the completion subscription live (so `wait` can be woken)?
    pub fn subscribed(&self) -> bool {
        self.inner.registry.connected()
    }

    /// Round trip to Redis, for readiness details and diagnostics.
    pub async fn ping(&self) -> Result<Duration, SharedError> {
        let t = Instant::now();
        self.call_raw(
            "ping",
            redis::cmd("PING").query_async::<Value>(&mut self.conn()),
        )
        .await
        .map(|_| t.elapsed())
    }

    /// The value of (`app_tag`, `run`), if there is one that passes the codec's checks. Its
    /// `fetched_at` lies as far back as the upstream answer (so `Age` is right) and its `ttl`,
    /// counted from there like every entry's, ends no later than what Redis has left of it (so a
    /// local copy expires no later than the shared one).
    pub async fn get(&self, app_tag: &str, run: RunId) -> Lookup {
        let Ok(keys) = self.keys("get", app_tag, run) else {
            return Lookup::Unavailable;
        };
        let mut p = redis::pipe();
        p.cmd("GET").arg(&keys.value).cmd("PTTL").arg(&keys.value);
        let reply = self
            .call("get", p.query_async::<(Value, i64)>(&mut self.conn()))
            .await;
        match reply {
            Ok((value, pttl)) => self.lookup_of("get", value, pttl, app_tag, run),
            Err(Unavailable) => Lookup::Unavailable,
        }
    }

    /// [`SharedTier::get`] and, on a miss, [`SharedTier::try_lock`], in one round trip: the
    /// value when there is one, else whether this call took the fetch lock.
    pub async fn get_or_lock(&self, app_tag: &str, run: RunId) -> (Lookup, LockResult) {
        let Ok(keys) = self.keys("get_or_lock", app_tag, run) else {
            return (Lookup::Unavailable, LockResult::Unavailable);
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut inv = lock::GET_OR_LOCK.prepare_invoke();
        inv.key(&keys.value)
            .key(&keys.lock)
            .arg(&token)
            .arg(codec::ceil_ms(self.config().lock_ttl));
        let reply = self
            .call(
                "get_or_lock",
                inv.invoke_async::<(i64, Value, i64)>(&mut self.conn()),
            )
            .await;
        match reply {
            Ok((1, value, pttl)) => {
                match self.lookup_of("get_or_lock", value, pttl, app_tag, run) {
                    // A value that failed its checks (or just expired): fetch under the lock, so
                    // the fresh answer replaces it.
                    Lookup::Miss => (Lookup::Miss, self.try_lock(app_tag, run).await),
                    found => (found, LockResult::Held),
                }
            }
            Ok((2, _, _)) => (Lookup::Miss, LockResult::acquired(keys.lock, token)),
            Ok(_) => (Lookup::Miss, LockResult::Held),
            Err(Unavailable) => (Lookup::Unavailable, LockResult::Unavailable),
        }
    }

    /// What a `GET` (`value`) and `PTTL` (`pttl`) of a run's value key found.
    fn lookup_of(
        &self,
        op: &'static str,
        value: Value,
        pttl: i64,
        app_tag: &str,
        run: RunId,
    ) -> Lookup {
        let bytes = match value {
            Value::Nil => return Lookup::Miss,
            Value::BulkString(b) => Bytes::from(b),
            _ => {
                self.fail(op, SharedError::Server, &"GET answered a non-string");
                return Lookup::Unavailable;
            }
        };
        let mut stored = match codec::decode(bytes, app_tag, run) {
            Ok(s) => s,
            Err(e) => {
                self.fail(op, SharedError::Corrupt, &e.as_str());
                return Lookup::Miss;
            }
        };
        if let Some(ttl) = stored.ttl {
            // Redis's clock decides expiry; gateways' clocks may disagree.
            match u64::try_from(pttl) {
                Ok(0) => return Lookup::Miss,
                Ok(left) => {
                    let until = stored
                        .fetched_at
                        .elapsed()
                        .saturating_add(Duration::from_millis(left));
                    stored.ttl = Some(ttl.min(until));
                }
                // -1: no expiry in Redis (kept as written); -2: gone since the GET.
                Err(_) if pttl == -2 => return Lookup::Miss,
                Err(_) => {}
            }
        }
        Lookup::Hit(Arc::new(stored))
    }

    /// Writes an answer the policy kept, expiring when its TTL (counted from when the upstream
    /// answered) runs out; terminal entries without a TTL do not expire.
    pub async fn put(&self, app_tag: &str, run: RunId, stored: &Stored) -> PutOutcome {
        if stored.class.is_none() {
            return PutOutcome::NotKept;
        }
        let Ok(keys) = self.keys("put", app_tag, run) else {
            return PutOutcome::Unavailable;
        };
        let age = stored.fetched_at.elapsed();
        let left = match stored.ttl {
            Some(ttl) if ttl <= age => return PutOutcome::NotKept,
            Some(ttl) => Some(ttl - age),
            None => None,
        };
        let stored_unix_ms = unix_ms_now().saturating_sub(age.as_millis() as u64);
        let value = match codec::encode(app_tag, run, stored, stored_unix_ms) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(target: "shared", error = %e, "answer not written to the shared cache");
                return PutOutcome::NotKept;
            }
        };
        let transfer = Duration::from_secs_f64(value.len() as f64 / PUT_BYTES_PER_SEC as f64);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&keys.value).arg(value);
        if let Some(left) = left {
            cmd.arg("PX").arg(codec::ceil_ms(left));
        }
        let timeout = self.inner.config.timeout + transfer;
        match self
            .call_within("put", timeout, cmd.query_async::<Value>(&mut self.conn()))
            .await
        {
            Ok(_) => PutOutcome::Written,
            Err(Unavailable) => PutOutcome::Unavailable,
        }
    }

    /// Tells every gateway that the fetch of (`app_tag`, `run`) is over; `stored` says whether
    /// it left a value to read. A lock holder uses [`SharedTier::finish`], which also unlocks.
    pub async fn notify_done(&self, app_tag: &str, run: RunId, stored: bool) -> NotifyOutcome {
        let Ok(keys) = self.keys("notify_done", app_tag, run) else {
            return NotifyOutcome::Unavailable;
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.inner.channel)
            .arg(keys::done_payload(&keys, stored));
        match self
            .call("notify_done", cmd.query_async::<Value>(&mut self.conn()))
            .await
        {
            Ok(_) => NotifyOutcome::Published,
            Err(Unavailable) => NotifyOutcome::Unavailable,
        }
    }

    /// Waits up to `max` for the fetch of (`app_tag`, `run`) that another holder of the lock is
    /// doing. Registers first, then re-checks Redis, so a completion published between the
    /// caller's `try_lock` and this wait is not missed.
    pub async fn wait(&self, app_tag: &str, run: RunId, max: Duration) -> WaitOutcome {
        let deadline = tokio::time::Instant::now() + max;
        let Ok(keys) = self.keys("wait", app_tag, run) else {
            return WaitOutcome::Unavailable;
        };
        let mut waiter = self.inner.registry.register(&keys.run);
        if !self.inner.registry.connected() {
            return WaitOutcome::Unavailable;
        }
        let mut p = redis::pipe();
        p.cmd("EXISTS")
            .arg(&keys.value)
            .cmd("EXISTS")
            .arg(&keys.lock);
        let recheck = tokio::time::timeout_at(
            deadline,
            self.call("wait", p.query_async::<(i64, i64)>(&mut self.conn())),
        )
        .await;
        match recheck {
            Err(_) => return WaitOutcome::TimedOut,
            Ok(Err(Unavailable)) => return WaitOutcome::Unavailable,
            Ok(Ok((value, _))) if value > 0 => return WaitOutcome::Notified { stored: true },
            Ok(Ok((_, 0))) => return WaitOutcome::Notified { stored: false },
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout_at(deadline, waiter.recv()).await {
            Ok(Some(Signal::Done { stored })) => WaitOutcome::Notified { stored },
            Ok(Some(Signal::Lost)) | Ok(None) => WaitOutcome::Unavailable,
            Err(_) => WaitOutcome::TimedOut,
        }
    }

    /// Completions of fetches of (`app_tag`, `run`) on any replica, from now on, while the
    /// returned waiter lives. Registered while the subscription is down, the waiter is told
    /// `Lost` when it comes up (whatever was published before then never reached it), and hears
    /// every completion after that.
    pub(crate) fn completions(&self, app_tag: &str, run: RunId) -> Option<Completions> {
        let keys = self.keys("watch", app_tag, run).ok()?;
        Some(self.inner.registry.register(&keys.run))
    }

    /// Deletes the value of (`app_tag`, `run`); `true` if there was one.
    pub async fn purge(&self, app_tag: &str, run: RunId) -> Result<bool, SharedError> {
        let keys = self
            .keys("purge", app_tag, run)
            .map_err(|_| SharedError::BadTag)?;
        let n: i64 = self
            .call_raw(
                "purge",
                redis::cmd("UNLINK")
                    .arg(&keys.value)
                    .query_async(&mut self.conn()),
            )
            .await?;
        Ok(n > 0)
    }

    /// Deletes every value of this deployment (every app, every run; locks are left to expire),
    /// in SCAN steps of about [`PURGE_BATCH`] keys, each bounded by the per-call timeout.
    /// Returns how many were deleted.
    pub async fn purge_all(&self) -> Result<u64, SharedError> {
        let pattern = keys::value_pattern(&self.inner.config.key_prefix);
        let mut conn = self.conn();
        let targets = self.call_raw("purge_all", conn.scan_targets()).await?;
        let mut removed = 0u64;
        for target in &targets {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(PURGE_BATCH);
                let reply = self
                    .call_raw("purge_all", conn.query_on(target, &scan))
                    .await?;
                let (next, batch): (u64, Vec<Vec<u8>>) =
                    redis::from_redis_value(reply).map_err(|_| SharedError::Server)?;
                if !batch.is_empty() {
                    let n: i64 = self
                        .call_raw(
                            "purge_all",
                            redis::cmd("UNLINK").arg(&batch).query_async(&mut conn),
                        )
                        .await?;
                    removed += u64::try_from(n).unwrap_or(0);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }

    /// A handle on the command connection for one call.
    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// Counts and logs a failure.
    fn fail(&self, op: &'static str, e: SharedError, detail: &dyn std::fmt::Display) {
        self.inner.health.fail(op, e, detail);
    }

    /// Runs one Redis call under the per-call timeout; a failure is counted, logged and
    /// returned by kind.
    async fn call_raw<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        self.call_raw_within(op, self.inner.config.timeout, fut)
            .await
    }

    /// [`SharedTier::call_raw`] with a timeout other than the per-call one.
    async fn call_raw_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let kind = SharedError::from_redis(&e);
                self.fail(op, kind, &e.category());
                Err(kind)
            }
            Err(_) => {
                self.fail(op, SharedError::Timeout, &"no answer within shared.timeout");
                Err(SharedError::Timeout)
            }
        }
    }

    /// [`SharedTier::call_raw`] for request-path calls, whose callers only need to know that
    /// the tier is unavailable.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.call_raw(op, fut).await.map_err(|_| Unavailable)
    }

    /// [`SharedTier::call`] with a timeout other than the per-call one.
    async fn call_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.call_raw_within(op, timeout, fut)
            .await
            .map_err(|_| Unavailable)
    }

    /// Local runs with registered waiters (for tests).
    #[doc(hidden)]
    pub fn waiting_runs(&self) -> usize {
        self.inner.registry.len()
    }
}
