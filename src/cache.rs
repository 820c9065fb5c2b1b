//! The in-process cache of upstream answers.
//!
//! Invariant: the cache's weight — body bytes, kept header bytes and a fixed per-entry overhead —
//! never exceeds `cache.max_bytes` after moka's pending maintenance runs, and each entry expires
//! after exactly the TTL the policy gave it (none for terminal runs unless `terminal_max_age`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use moka::notification::RemovalCause;
use moka::sync::Cache as Moka;
use moka::Expiry;

use crate::metrics::{CacheMetrics, CauseLabel, ClassLabel};
use crate::policy::EntryClass;
use crate::run_id::RunId;

/// Which configured app an entry belongs to. Dify scopes runs to the key's app, so the app is
/// part of every cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(pub u32);

/// Identity of a cache entry: (app, canonical run id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub app: AppId,
    pub run: RunId,
}

/// Weight charged per entry beyond its bytes: the key, the `Arc<Stored>`, moka's own
/// bookkeeping and allocator slack (~440 bytes measured by `examples/body-retention.rs cache`),
/// rounded up, so the byte cap bounds real memory rather than only body bytes.
pub const ENTRY_OVERHEAD: u32 = 512;

/// The upstream response headers the gateway keeps and forwards. Entries share one instance
/// when their headers are identical (they nearly always are), saving ~150 bytes per entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeptHeaders {
    pub content_type: Option<HeaderValue>,
    pub x_version: Option<HeaderValue>,
    pub x_env: Option<HeaderValue>,
    /// Forwarded so clients back off (it matters on 429/503, which are never kept); the
    /// shared tier does not store it.
    pub retry_after: Option<HeaderValue>,
}

impl KeptHeaders {
    fn len(&self) -> usize {
        [
            &self.content_type,
            &self.x_version,
            &self.x_env,
            &self.retry_after,
        ]
        .iter()
        .filter_map(|v| v.as_ref().map(|v| v.len()))
        .sum()
    }
}

/// One upstream answer as received: status, kept headers and the body bytes untouched. Shared
/// by reference between the cache and every request it answers.
#[derive(Debug)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: Arc<KeptHeaders>,
    pub body: Bytes,
    /// What the policy made of it; `None` when it is not kept.
    pub class: Option<EntryClass>,
    /// How long it may be reused; `None` with a class means no expiry.
    pub ttl: Option<Duration>,
    /// When the upstream answered (for `Age`).
    pub fetched_at: Instant,
}

impl Stored {
    /// The entry's weight for the byte cap, saturating at `u32::MAX`.
    pub fn weight(&self) -> u32 {
        let bytes = self.body.len() + self.headers.len();
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .saturating_add(ENTRY_OVERHEAD)
    }
}

/// What moka holds: the answer and until when it is fresh.
#[derive(Clone)]
struct Slot {
    stored: Arc<Stored>,
    /// `None`: fresh until evicted (terminal runs without `terminal_max_age`).
    fresh_until: Option<Instant>,
}

/// A cache entry as a lookup finds it.
#[derive(Debug, Clone)]
pub struct Found {
    pub stored: Arc<Stored>,
    /// False once its TTL has passed: it is kept only to be served if a refresh fails.
    pub fresh: bool,
}

/// Gives each entry the TTL the policy decided, plus, for running entries, the stale-if-error
/// grace during which it is kept (not fresh) for outages.
struct PerEntryTtl {
    grace: Duration,
}

impl PerEntryTtl {
    fn lifetime(&self, s: &Stored) -> Option<Duration> {
        let ttl = s.ttl?;
        Some(match s.class {
            Some(EntryClass::Running) => ttl.saturating_add(self.grace),
            _ => ttl,
        })
    }
}

impl Expiry<CacheKey, Slot> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Slot,
        _now: Instant,
    ) -> Option<Duration> {
        self.lifetime(&value.stored)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Slot,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.lifetime(&value.stored)
    }
}

/// Counts of what the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub weighted_bytes: u64,
}

/// Why an entry left the cache (a metric label).
fn cause_str(c: RemovalCause) -> &'static str {
    match c {
        RemovalCause::Expired => "expired",
        RemovalCause::Explicit => "purged",
        RemovalCause::Replaced => "replaced",
        RemovalCause::Size => "size",
    }
}

fn class_label(v: &Stored) -> ClassLabel {
    ClassLabel {
        class: v.class.map_or("none", |c| c.as_str()),
    }
}

/// The cache: moka, weighed by bytes, with per-entry expiry.
#[derive(Clone)]
pub struct Cache {
    inner: Moka<CacheKey, Slot>,
    metrics: CacheMetrics,
}

impl Cache {
    /// A cache holding at most `max_bytes` of weight, keeping running entries `stale_grace`
    /// past their TTL for stale-if-error, reporting into `metrics`.
    pub fn new(max_bytes: u64, stale_grace: Duration, metrics: CacheMetrics) -> Cache {
        let m = metrics.clone();
        let inner = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Slot| v.stored.weight())
            .expire_after(PerEntryTtl { grace: stale_grace })
            .eviction_listener(move |_k, slot: Slot, cause| {
                let v = slot.stored;
                let class = class_label(&v);
                m.entries.get_or_create(&class).dec();
                m.bytes.get_or_create(&class).dec_by(i64::from(v.weight()));
                m.evictions
                    .get_or_create(&CauseLabel {
                        cause: cause_str(cause),
                    })
                    .inc();
            })
            .build();
        Cache { inner, metrics }
    }

    /// A fresh entry, if any (the hit path).
    #[inline]
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        let slot = self.inner.get(key)?;
        match slot.fresh_until {
            Some(t) if Instant::now() >= t => None,
            _ => Some(slot.stored),
        }
    }

    /// An entry, fresh or kept past its TTL for stale-if-error.
    pub fn lookup(&self, key: &CacheKey) -> Option<Found> {
        let slot = self.inner.get(key)?;
        let fresh = slot.fresh_until.is_none_or(|t| Instant::now() < t);
        Some(Found {
            stored: slot.stored,
            fresh,
        })
    }

    /// Keeps an answer the policy classified. Answers without a class are ignored, so a caller
    /// cannot cache an error by mistake.
    pub fn insert(&self, key: CacheKey, value: Arc<Stored>) {
        if value.class.is_some() {
            let class = class_label(&value);
            self.metrics.entries.get_or_create(&class).inc();
            self.metrics
                .bytes
                .get_or_create(&class)
                .inc_by(i64::from(value.weight()));
            let fresh_until = value.ttl.map(|t| Instant::now() + t);
            self.inner.insert(
                key,
                Slot {
                    stored: value,
                    fresh_until,
                },
            );
        }
    }

    /// Drops one entry.
    pub fn remove(&self, key: &CacheKey) {
        self.inner.invalidate(key);
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Entries and weight, after running moka's pending maintenance so the figures are current.
    pub fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks();
        CacheStats {
            entries: self.inner.entry_count(),
            weighted_bytes: self.inner.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn stored(body: usize, class: Option<EntryClass>, ttl: Option<Duration>) -> Arc<Stored> {
        Arc::new(Stored {
            status: StatusCode::OK,
            headers: Arc::default(),
            body: Bytes::from(vec![b'x'; body]),
            class,
            ttl,
            fetched_at: Instant::now(),
        })
    }

    fn key(n: u128) -> CacheKey {
        CacheKey {
            app: AppId(0),
            run: RunId::from(Uuid::from_u128(n)),
        }
    }

    #[test]
    fn unclassified_answers_are_not_kept() {
        let c = Cache::new(1 << 20, Duration::ZERO, CacheMetrics::default());
        c.insert(key(1), stored(10, None, None));
        assert!(c.get(&key(1)).is_none());
        c.insert(key(1), stored(10, Some(EntryClass::Terminal), None));
        assert!(c.get(&key(1)).is_some());
    }

    #[test]
    fn weight_is_bounded_by_max_bytes() {
        let cap = 1 << 20;
        let c = Cache::new(cap, Duration::ZERO, CacheMetrics::default());
        for n in 0..10_000 {
            c.insert(key(n), stored(1000, Some(EntryClass::Terminal), None));
        }
        let s = c.stats();
        assert!(s.weighted_bytes <= cap, "{s:?}");
        assert!(s.entries > 100 && s.entries < 1100, "{s:?}");
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let c = Cache::new(1 << 20, Duration::ZERO, CacheMetrics::default());
        c.insert(
            key(1),
            stored(
                10,
                Some(EntryClass::Running),
                Some(Duration::from_millis(50)),
            ),
        );
        c.insert(key(2), stored(10, Some(EntryClass::Terminal), None));
        assert!(c.get(&key(1)).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(2)).is_some());
    }

    #[test]
    fn running_entries_outlive_their_ttl_as_stale_for_the_grace() {
        let c = Cache::new(1 << 20, Duration::from_millis(300), CacheMetrics::default());
        c.insert(
            key(1),
            stored(
                10,
                Some(EntryClass::Running),
                Some(Duration::from_millis(50)),
            ),
        );
        c.insert(
            key(2),
            stored(
                10,
                Some(EntryClass::NotFound),
                Some(Duration::from_millis(50)),
            ),
        );
        assert!(c.lookup(&key(1)).unwrap().fresh);
        std::thread::sleep(Duration::from_millis(100));
        assert!(c.get(&key(1)).is_none(), "not fresh");
        let stale = c.lookup(&key(1)).expect("kept for the grace");
        assert!(!stale.fresh);
        assert!(c.lookup(&key(2)).is_none(), "404s get no grace");
        std::thread::sleep(Duration::from_millis(300));
        assert!(c.lookup(&key(1)).is_none());
    }
}
