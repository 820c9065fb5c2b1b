//! The store of running and not-found answers: few, and each kept for about a second.
//!
//! Invariant: each entry expires exactly `ttl` after its `fetched_at` — a running entry
//! `stale_grace` later, kept no longer fresh for stale-if-error — and every entry that leaves the
//! store is subtracted from its class's gauges exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::{CacheKey, Removal, Stored, Tally};
use crate::policy::EntryClass;

/// Gives each entry what is left of the TTL the policy decided, plus, for running entries, the
/// stale-if-error grace during which it is kept (not fresh) for outages.
struct PerEntryTtl {
    /// How long a running entry is kept past its TTL, for stale-if-error.
    grace: Duration,
}

impl PerEntryTtl {
    fn lifetime(&self, s: &Stored, now: Instant) -> Option<Duration> {
        let ttl = s.ttl?;
        let kept = match s.class {
            Some(EntryClass::Running) => ttl.saturating_add(self.grace),
            _ => ttl,
        };
        Some(kept.saturating_sub(now.saturating_duration_since(s.fetched_at)))
    }
}

impl Expiry<CacheKey, Arc<Stored>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Stored>,
        now: Instant,
    ) -> Option<Duration> {
        self.lifetime(value, now)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Stored>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.lifetime(value, now)
    }
}

/// Running and not-found entries in moka, weighed by bytes, with per-entry expiry.
pub(super) struct TransientStore {
    /// moka, weighed by bytes, each entry expiring at its own time.
    inner: Moka<CacheKey, Arc<Stored>>,
    /// The gauges and eviction counters shared with the terminal store.
    tally: Tally,
}

impl TransientStore {
    /// A store holding at most `max_bytes` of weight, keeping running entries `stale_grace`
    /// past their TTL.
    pub(super) fn new(max_bytes: u64, stale_grace: Duration, tally: Tally) -> TransientStore {
        let t = tally.clone();
        let inner = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Stored>| v.weight())
            .expire_after(PerEntryTtl { grace: stale_grace })
            .eviction_listener(move |_k, v: Arc<Stored>, cause| {
                let cause = match cause {
                    RemovalCause::Expired => Removal::Expired,
                    RemovalCause::Replaced => Removal::Replaced,
                    RemovalCause::Size => Removal::Size,
                    // Counted by the caller, which knows why (`remove`, `clear`, a run that
                    // finished).
                    RemovalCause::Explicit => return,
                };
                t.removed(&v, cause);
            })
            .build();
        TransientStore { inner, tally }
    }

    /// The entry, fresh or kept past its TTL for stale-if-error.
    pub(super) fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        self.inner.get(key)
    }

    /// Keeps `value`, replacing any entry for `key`.
    pub(super) fn insert(&self, key: CacheKey, value: Arc<Stored>) {
        self.tally.added(&value);
        self.inner.insert(key, value);
    }

    /// Drops the entry for `key`, if any, counting it under `cause`.
    pub(super) fn remove(&self, key: &CacheKey, cause: Removal) {
        if let Some(old) = self.inner.remove(key) {
            self.tally.removed(&old, cause);
        }
    }

    /// Drops every entry.
    pub(super) fn clear(&self) {
        for (key, _) in self.inner.iter() {
            self.remove(&key, Removal::Purged);
        }
    }

    /// Entries and weight held, after running moka's pending maintenance.
    pub(super) fn stats(&self) -> (u64, u64) {
        self.inner.run_pending_tasks();
        (self.inner.entry_count(), self.inner.weighted_size())
    }
}
