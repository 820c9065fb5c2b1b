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

/// The share of a shard's capacity one entry may weigh at most (quick_cache's default hot
/// allocation): a heavier entry is not kept, so shards are sized from the largest answer.
const ENTRY_SHARE_OF_SHARD: f64 = 0.97;

/// Room for an entry's kept headers beyond its body when sizing shards for the largest answer.
const HEADER_ROOM: u64 = 64 << 10;

/// Weighs an entry for the byte cap.
#[derive(Clone)]
struct ByWeight;

impl Weighter<CacheKey, Arc<Stored>> for ByWeight {
    #[inline]
    fn weight(&self, _key: &CacheKey, value: &Arc<Stored>) -> u64 {
        u64::from(value.weight())
    }
}

/// The key and value an insert brings: the store reports a value it drops — the old one it
/// replaces, the new one when too heavy, any other it evicts to make room — through one hook,
/// and this tells a replacement from a size eviction.
#[derive(Default)]
struct Inserting(Option<(CacheKey, Arc<Stored>)>);

/// Keeps the gauges right for entries the store drops on its own (size evictions, rejections,
/// replacements).
#[derive(Clone)]
struct Accounting(Tally);

impl Lifecycle<CacheKey, Arc<Stored>> for Accounting {
    type RequestState = Inserting;

    fn on_evict(&self, state: &mut Inserting, key: CacheKey, value: Arc<Stored>) {
        let replaced = state
            .0
            .as_ref()
            .is_some_and(|(k, new)| *k == key && !Arc::ptr_eq(new, &value));
        let cause = if replaced {
            Removal::Replaced
        } else {
            Removal::Size
        };
        self.0.removed(&value, cause);
    }
}

/// Terminal entries, weighed by bytes, with no per-entry timers.
pub(super) struct TerminalStore {
    /// quick_cache, weighed by bytes; its hook counts what it drops on its own.
    inner: QuickCache<CacheKey, Arc<Stored>, ByWeight, DefaultHashBuilder, Accounting>,
    /// The gauges and eviction counters shared with the transient store.
    tally: Tally,
}

impl TerminalStore {
    /// A store holding at most `max_bytes` of weight, able to keep an answer of
    /// `largest_body` bytes (when the whole store can).
    pub(super) fn new(max_bytes: u64, largest_body: u64, tally: Tally) -> TerminalStore {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let largest = largest_body + HEADER_ROOM + u64::from(super::ENTRY_OVERHEAD);
        let min_shard_bytes = (largest as f64 / ENTRY_SHARE_OF_SHARD).ceil() as u64;
        let by_size = usize::try_from(max_bytes / min_shard_bytes.max(1)).unwrap_or(usize::MAX);
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
        let mut inserting = Inserting(Some((key, Arc::clone(&value))));
        self.inner.insert_with_lifecycle(key, value, &mut inserting);
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
