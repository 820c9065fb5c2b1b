//! The store of terminal entries: answers that never change, kept until evicted by size or, with
//! `terminal_max_age`, until read after their age.
//!
//! Invariant: every entry that leaves the store — evicted, rejected as too heavy, replaced,
//! expired, removed or cleared — is subtracted from the terminal gauges exactly once and counted
//! under one cause, so the gauges always equal what the store holds.

use std::sync::Arc;

use quick_cache::sync::Cache as QuickCache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use super::{CacheKey, Removal, Stored, Tally};

/// What a typical terminal entry weighs, to size the store's ghost list from its byte capacity.
/// Ghosts are keys recently evicted, remembered so that one asked for again comes back as hot;
/// at quick_cache's default allocation (half the expected entry count) they cost ~20 bytes per
/// entry once the store is full, against ~180 without them.
const TYPICAL_ENTRY_WEIGHT: u64 = 4096;

/// The least byte capacity of one shard: an entry heavier than about a shard's capacity is not
/// kept, so shards are never made smaller than the largest answer the upstream client accepts by
/// default (`upstream.max_body_bytes`, 16 MiB).
const MIN_SHARD_BYTES: u64 = 16 << 20;

/// Weighs an entry for the byte cap.
#[derive(Clone)]
struct ByWeight;

impl Weighter<CacheKey, Arc<Stored>> for ByWeight {
    #[inline]
    fn weight(&self, _key: &CacheKey, value: &Arc<Stored>) -> u64 {
        u64::from(value.weight())
    }
}

/// The key whose old value an insert replaces, if it is there: the store reports that value
/// through the same hook as a size eviction, and this tells the two apart.
#[derive(Default)]
struct Inserting(Option<CacheKey>);

/// Keeps the gauges right for entries the store drops on its own (size evictions, rejections,
/// replacements).
#[derive(Clone)]
struct Accounting(Tally);

impl Lifecycle<CacheKey, Arc<Stored>> for Accounting {
    type RequestState = Inserting;

    fn on_evict(&self, state: &mut Inserting, key: CacheKey, value: Arc<Stored>) {
        let cause = match state.0.take_if(|k| *k == key) {
            Some(_) => Removal::Replaced,
            None => Removal::Size,
        };
        self.0.removed(&value, cause);
    }
}

/// Terminal entries, weighed by bytes, with no per-entry timers.
pub(super) struct TerminalStore {
    inner: QuickCache<CacheKey, Arc<Stored>, ByWeight, DefaultHashBuilder, Accounting>,
    tally: Tally,
}

impl TerminalStore {
    /// A store holding at most `max_bytes` of weight.
    pub(super) fn new(max_bytes: u64, tally: Tally) -> TerminalStore {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let by_size = usize::try_from(max_bytes / MIN_SHARD_BYTES).unwrap_or(usize::MAX);
        let shards = (cores * 4).min(by_size).max(1);
        // A power of two no larger than asked for (quick_cache rounds up).
        let shards = 1 << shards.ilog2();
        let options = OptionsBuilder::new()
            .shards(shards)
            .weight_capacity(max_bytes)
            .estimated_items_capacity(
                usize::try_from(max_bytes / TYPICAL_ENTRY_WEIGHT).unwrap_or(usize::MAX),
            )
            .build()
            .expect("weight capacity is set");
        let inner = QuickCache::with_options(
            options,
            ByWeight,
            DefaultHashBuilder::default(),
            Accounting(tally.clone()),
        );
        TerminalStore { inner, tally }
    }

    /// The entry, unless it is absent or past its `ttl` (then it is dropped as expired).
    #[inline]
    pub(super) fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        let value = self.inner.get(key)?;
        match value.ttl {
            Some(ttl) if value.fetched_at.elapsed() >= ttl => {
                self.expire(key, &value);
                None
            }
            _ => Some(value),
        }
    }

    /// Drops `value` as expired, unless a newer answer already took its place.
    #[cold]
    fn expire(&self, key: &CacheKey, value: &Arc<Stored>) {
        if let Some((_, old)) = self.inner.remove_if(key, |v| Arc::ptr_eq(v, value)) {
            self.tally.removed(&old, Removal::Expired);
        }
    }

    /// Keeps `value`, replacing any entry for `key`.
    pub(super) fn insert(&self, key: CacheKey, value: Arc<Stored>) {
        self.tally.added(&value);
        self.inner
            .insert_with_lifecycle(key, value, &mut Inserting(Some(key)));
    }

    /// Drops the entry for `key`, if any.
    pub(super) fn remove(&self, key: &CacheKey) {
        if let Some((_, old)) = self.inner.remove(key) {
            self.tally.removed(&old, Removal::Purged);
        }
    }

    /// Drops every entry.
    pub(super) fn clear(&self) {
        for (_, old) in self.inner.drain() {
            self.tally.removed(&old, Removal::Purged);
        }
    }

    /// Entries held.
    pub(super) fn len(&self) -> u64 {
        self.inner.len() as u64
    }

    /// Weight held.
    pub(super) fn weight(&self) -> u64 {
        self.inner.weight()
    }
}
