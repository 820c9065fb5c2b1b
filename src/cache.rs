//! The in-process cache of upstream answers, in two stores.
//!
//! Terminal runs — immutable and by far the most numerous — live in a compact store
//! ([`quick_cache`]) with no per-entry timers; `terminal_max_age`, when set, is checked when an
//! entry is read. Running and not-found answers — few, each kept about a second — live in moka
//! with per-entry expiry. Up to an eighth of `cache.max_bytes` is set aside for running and
//! not-found answers (an answer heavier than that eighth is not kept while running); the
//! terminal store gets the rest and is sharded so that it keeps an answer of
//! `upstream.max_body_bytes`.
//!
//! Invariant: the two stores' weight — body bytes, kept header bytes and a fixed per-entry
//! overhead for each store — never exceeds `cache.max_bytes` (after moka's pending maintenance
//! runs), each entry is fresh until exactly `ttl` after its `fetched_at` (forever for terminal runs unless
//! `terminal_max_age`), and the `cache_entries`/`cache_bytes` gauges equal what the stores hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{CacheMetrics, CauseLabel, ClassLabel};
use crate::policy::EntryClass;
use crate::run_id::RunId;
use crate::upstream::{X_ENV, X_VERSION};

pub mod fetch;
mod terminal;
mod transient;

use terminal::TerminalStore;
use transient::TransientStore;

/// Which configured app an entry belongs to (see [`crate::upstream::AppId`]).
pub use crate::upstream::AppId;

/// Identity of a cache entry: (app, canonical run id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub app: AppId,
    pub run: RunId,
}

/// Weight charged per terminal entry beyond its bytes, so the byte cap bounds the process's
/// real memory rather than only body bytes. The store's own records — the key, the
/// `Arc<Stored>`, the slab and map slots, ghost keys — cost ~178 bytes (~204 once the store is
/// full), measured by `cargo run --release --example body-retention -- cache 100000 1600`; a
/// gateway that filled its cache from the upstream holds ~500 bytes per entry beyond the body
/// (`benches/e2e.sh`, memory scenario: the rest is allocator fragmentation, kept bodies sitting
/// between the fetch path's freed buffers), rounded up here.
pub const ENTRY_OVERHEAD: u32 = 512;

/// Weight charged per running or not-found entry beyond its bytes: moka's own per-entry records
/// (deque nodes, entry info, timer wheel node) cost ~470 bytes, rounded up. These are few.
const TRANSIENT_ENTRY_OVERHEAD: u32 = 512;

/// The largest body [`Cache::new`] is sized for: `upstream.max_body_bytes`' default.
pub const DEFAULT_LARGEST_BODY: u64 = 16 << 20;

/// Share of `max_bytes` set aside for running and not-found answers (one part in this many).
const TRANSIENT_SHARE: u64 = 8;

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
    /// The headers of an upstream answer the gateway keeps.
    pub fn keep(h: &HeaderMap) -> KeptHeaders {
        let keep = |name: &HeaderName| h.get(name).cloned();
        KeptHeaders {
            content_type: keep(&CONTENT_TYPE),
            x_version: keep(&X_VERSION),
            x_env: keep(&X_ENV),
            retry_after: keep(&RETRY_AFTER),
        }
    }

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
    /// Its strong entity tag, [`etag_of`] the body: computed once when the entry is made, so a
    /// hit only lends it.
    pub etag: HeaderValue,
    /// What the policy made of it; `None` when it is not kept.
    pub class: Option<EntryClass>,
    /// How long after `fetched_at` it may be reused; `None` with a class means no expiry.
    pub ttl: Option<Duration>,
    /// When the upstream answered (for `Age`, and the start of `ttl`).
    pub fetched_at: Instant,
}

/// The strong entity tag of a body: the first 128 bits of its SHA-256, in hex, quoted. The same
/// bytes give the same tag on every replica and across restarts.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(body);
    let mut tag = Vec::with_capacity(34);
    tag.push(b'"');
    for b in &digest[..16] {
        tag.push(HEX[usize::from(b >> 4)]);
        tag.push(HEX[usize::from(b & 0xf)]);
    }
    tag.push(b'"');
    HeaderValue::from_maybe_shared(Bytes::from(tag)).expect("hex in quotes is a header value")
}

impl Stored {
    /// The entry's weight for the byte cap, saturating at `u32::MAX`.
    pub fn weight(&self) -> u32 {
        let bytes = self.body.len() + self.headers.len();
        let overhead = match self.class {
            Some(EntryClass::Running | EntryClass::NotFound) => TRANSIENT_ENTRY_OVERHEAD,
            Some(EntryClass::Terminal) | None => ENTRY_OVERHEAD,
        };
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .saturating_add(overhead)
    }

    /// Whether its `ttl` has not yet run out.
    fn is_fresh(&self) -> bool {
        self.ttl.is_none_or(|ttl| self.fetched_at.elapsed() < ttl)
    }
}

/// A cache entry as a lookup finds it.
#[derive(Debug, Clone)]
pub struct Found {
    pub stored: Arc<Stored>,
    /// False once its TTL has passed: it is kept only to be served if a refresh fails.
    pub fresh: bool,
}

/// Counts of what the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub weighted_bytes: u64,
}

/// Why an entry left the cache; the `cause` label of `cache_evictions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Pushed out to stay under the byte cap, or too heavy to keep at all.
    Size,
    /// Its time ran out.
    Expired,
    /// Dropped on request (`remove`, `clear`).
    Purged,
    /// A newer answer for the same key took its place.
    Replaced,
}

impl Removal {
    /// Every cause, in declaration order (so `cause as usize` indexes it).
    const ALL: [Removal; 4] = [
        Removal::Size,
        Removal::Expired,
        Removal::Purged,
        Removal::Replaced,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Removal::Size => "size",
            Removal::Expired => "expired",
            Removal::Purged => "purged",
            Removal::Replaced => "replaced",
        }
    }
}

/// One class's gauges, resolved once.
#[derive(Clone)]
struct ClassGauges {
    entries: Gauge,
    bytes: Gauge,
}

/// The cache's metric handles, resolved once so that neither store hashes a label set per
/// entry: every entry is added here when kept and removed here exactly once when it leaves.
#[derive(Clone)]
struct Tally {
    terminal: ClassGauges,
    running: ClassGauges,
    not_found: ClassGauges,
    /// By [`Removal`], indexed as [`Removal::ALL`].
    evictions: [Counter; 4],
}

impl Tally {
    fn new(m: &CacheMetrics) -> Tally {
        let class = |c: EntryClass| {
            let l = ClassLabel { class: c.as_str() };
            ClassGauges {
                entries: m.entries.get_or_create(&l).clone(),
                bytes: m.bytes.get_or_create(&l).clone(),
            }
        };
        let cause = |r: Removal| {
            m.evictions
                .get_or_create(&CauseLabel { cause: r.as_str() })
                .clone()
        };
        Tally {
            terminal: class(EntryClass::Terminal),
            running: class(EntryClass::Running),
            not_found: class(EntryClass::NotFound),
            evictions: Removal::ALL.map(cause),
        }
    }

    /// The gauges of `s`'s class; `None` for answers the cache never keeps.
    fn gauges(&self, s: &Stored) -> Option<&ClassGauges> {
        Some(match s.class? {
            EntryClass::Terminal => &self.terminal,
            EntryClass::Running => &self.running,
            EntryClass::NotFound => &self.not_found,
        })
    }

    fn added(&self, s: &Stored) {
        if let Some(g) = self.gauges(s) {
            g.entries.inc();
            g.bytes.inc_by(i64::from(s.weight()));
        }
    }

    fn removed(&self, s: &Stored, cause: Removal) {
        if let Some(g) = self.gauges(s) {
            g.entries.dec();
            g.bytes.dec_by(i64::from(s.weight()));
        }
        self.evictions[cause as usize].inc();
    }
}

/// The cache: terminal entries in a compact store, running and not-found entries in moka, both
/// weighed by bytes.
#[derive(Clone)]
pub struct Cache {
    terminal: Arc<TerminalStore>,
    transient: Arc<TransientStore>,
}

impl Cache {
    /// A cache holding at most `max_bytes` of weight (an eighth of it for running and not-found
    /// answers), keeping running entries `stale_grace` past their TTL for stale-if-error,
    /// reporting into `metrics`, sized for bodies up to [`DEFAULT_LARGEST_BODY`].
    pub fn new(max_bytes: u64, stale_grace: Duration, metrics: CacheMetrics) -> Cache {
        Cache::with_largest_body(max_bytes, DEFAULT_LARGEST_BODY, stale_grace, metrics)
    }

    /// [`Cache::new`], able to keep a terminal answer of `largest_body` bytes (the upstream
    /// client's `max_body_bytes`) whenever the terminal part of `max_bytes` can hold it.
    pub fn with_largest_body(
        max_bytes: u64,
        largest_body: u64,
        stale_grace: Duration,
        metrics: CacheMetrics,
    ) -> Cache {
        let tally = Tally::new(&metrics);
        let transient_bytes = max_bytes / TRANSIENT_SHARE;
        Cache {
            terminal: Arc::new(TerminalStore::new(
                max_bytes - transient_bytes,
                largest_body,
                tally.clone(),
            )),
            transient: Arc::new(TransientStore::new(transient_bytes, stale_grace, tally)),
        }
    }

    /// A fresh entry, if any (the hit path).
    #[inline]
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        self.lookup(key).filter(|f| f.fresh).map(|f| f.stored)
    }

    /// An entry, fresh or kept past its TTL for stale-if-error.
    pub fn lookup(&self, key: &CacheKey) -> Option<Found> {
        if let Some(stored) = self.terminal.get(key) {
            return Some(Found {
                stored,
                fresh: true,
            });
        }
        let stored = self.transient.get(key)?;
        Some(Found {
            fresh: stored.is_fresh(),
            stored,
        })
    }

    /// Keeps an answer the policy classified. Answers without a class are ignored, so a caller
    /// cannot cache an error by mistake.
    pub fn insert(&self, key: CacheKey, value: Arc<Stored>) {
        match value.class {
            Some(EntryClass::Terminal) => {
                self.terminal.insert(key, value);
                // The run finished: its running entry is superseded.
                self.transient.remove(&key, Removal::Replaced);
            }
            Some(EntryClass::Running | EntryClass::NotFound) => self.transient.insert(key, value),
            None => {}
        }
    }

    /// Drops one entry.
    pub fn remove(&self, key: &CacheKey) {
        self.terminal.remove(key);
        self.transient.remove(key, Removal::Purged);
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.terminal.clear();
        self.transient.clear();
    }

    /// Entries and weight of both stores, after running moka's pending maintenance so the
    /// figures are current.
    pub fn stats(&self) -> CacheStats {
        let (entries, weighted_bytes) = self.transient.stats();
        CacheStats {
            entries: entries + self.terminal.len(),
            weighted_bytes: weighted_bytes + self.terminal.weight(),
        }
    }
}

#[cfg(test)]
mod tests;
