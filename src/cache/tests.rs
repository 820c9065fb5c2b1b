//! Tests of the cache through its public API.

use super::*;
use crate::metrics::{CauseLabel, ClassLabel};
use uuid::Uuid;

const TERMINAL: Option<EntryClass> = Some(EntryClass::Terminal);
const RUNNING: Option<EntryClass> = Some(EntryClass::Running);
const NOT_FOUND: Option<EntryClass> = Some(EntryClass::NotFound);

fn stored(body: usize, class: Option<EntryClass>, ttl: Option<Duration>) -> Arc<Stored> {
    Arc::new(Stored {
        status: StatusCode::OK,
        headers: Arc::default(),
        body: Bytes::from(vec![b'x'; body]),
        etag: crate::cache::etag_of(&vec![b'x'; body]),
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
    c.insert(key(1), stored(10, TERMINAL, None));
    assert!(c.get(&key(1)).is_some());
}

#[test]
fn weight_is_bounded_by_max_bytes() {
    let cap = 1 << 20;
    let c = Cache::new(cap, Duration::ZERO, CacheMetrics::default());
    for n in 0..10_000 {
        c.insert(key(n), stored(1000, TERMINAL, None));
    }
    let s = c.stats();
    assert!(s.weighted_bytes <= cap, "{s:?}");
    assert!(s.entries > 100 && s.entries < 1100, "{s:?}");
}

#[test]
fn entries_expire_after_their_ttl() {
    let c = Cache::new(1 << 20, Duration::ZERO, CacheMetrics::default());
    c.insert(key(1), stored(10, RUNNING, Some(Duration::from_millis(50))));
    c.insert(key(2), stored(10, TERMINAL, None));
    assert!(c.get(&key(1)).is_some());
    std::thread::sleep(Duration::from_millis(120));
    assert!(c.get(&key(1)).is_none());
    assert!(c.get(&key(2)).is_some());
}

#[test]
fn running_entries_outlive_their_ttl_as_stale_for_the_grace() {
    let c = Cache::new(1 << 20, Duration::from_millis(300), CacheMetrics::default());
    c.insert(key(1), stored(10, RUNNING, Some(Duration::from_millis(50))));
    c.insert(
        key(2),
        stored(10, NOT_FOUND, Some(Duration::from_millis(50))),
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

/// Entries and weighted bytes the gauges report, summed over the classes.
fn gauges(m: &CacheMetrics) -> CacheStats {
    let mut s = CacheStats {
        entries: 0,
        weighted_bytes: 0,
    };
    for c in [
        EntryClass::Terminal,
        EntryClass::Running,
        EntryClass::NotFound,
    ] {
        let l = ClassLabel { class: c.as_str() };
        s.entries += u64::try_from(m.entries.get_or_create(&l).get()).expect("not negative");
        s.weighted_bytes += u64::try_from(m.bytes.get_or_create(&l).get()).expect("not negative");
    }
    s
}

fn class_entries(m: &CacheMetrics, c: EntryClass) -> i64 {
    m.entries
        .get_or_create(&ClassLabel { class: c.as_str() })
        .get()
}

fn evictions(m: &CacheMetrics, cause: &'static str) -> u64 {
    m.evictions.get_or_create(&CauseLabel { cause }).get()
}

#[test]
fn terminal_entries_without_a_ttl_survive_running_churn() {
    let m = CacheMetrics::default();
    let c = Cache::new(1 << 20, Duration::ZERO, m.clone());
    c.insert(key(1), stored(1000, TERMINAL, None));
    // Far more running and not-found answers than their eighth of the cap holds.
    for n in 2..2000 {
        let class = if n % 2 == 0 { RUNNING } else { NOT_FOUND };
        c.insert(key(n), stored(1000, class, Some(Duration::from_millis(20))));
    }
    std::thread::sleep(Duration::from_millis(50));
    let s = c.stats();
    assert!(evictions(&m, "size") > 1000, "{s:?}");
    assert!(c.get(&key(1)).is_some());
    assert!(c.lookup(&key(1)).unwrap().fresh);
    assert_eq!(class_entries(&m, EntryClass::Terminal), 1);
    assert_eq!(gauges(&m), s);
}

#[test]
fn terminal_max_age_is_checked_when_read() {
    let m = CacheMetrics::default();
    let c = Cache::new(1 << 20, Duration::from_secs(30), m.clone());
    c.insert(
        key(1),
        stored(10, TERMINAL, Some(Duration::from_millis(50))),
    );
    assert!(c.get(&key(1)).is_some());
    std::thread::sleep(Duration::from_millis(80));
    // Gone at the first read past its age, with no stale grace.
    assert!(c.lookup(&key(1)).is_none());
    assert!(c.get(&key(1)).is_none());
    assert_eq!(evictions(&m, "expired"), 1);
    assert_eq!(c.stats().entries, 0);
    assert_eq!(gauges(&m), c.stats());

    // The age counts from when the upstream answered, not from the insert.
    let old = Stored {
        fetched_at: Instant::now() - Duration::from_secs(2),
        ..Arc::into_inner(stored(10, TERMINAL, Some(Duration::from_secs(1)))).expect("one owner")
    };
    c.insert(key(2), Arc::new(old));
    assert!(c.get(&key(2)).is_none());
    assert_eq!(evictions(&m, "expired"), 2);
    assert_eq!(gauges(&m), c.stats());
}

#[test]
fn a_terminal_insert_replaces_the_running_entry() {
    let m = CacheMetrics::default();
    let c = Cache::new(1 << 20, Duration::from_secs(30), m.clone());
    c.insert(key(1), stored(10, RUNNING, Some(Duration::from_secs(10))));
    c.insert(key(2), stored(10, RUNNING, Some(Duration::from_secs(10))));
    c.insert(key(1), stored(20, TERMINAL, None));
    let got = c.get(&key(1)).expect("kept");
    assert_eq!(got.class, TERMINAL);
    assert_eq!(c.stats().entries, 2);
    assert_eq!(class_entries(&m, EntryClass::Running), 1);
    assert_eq!(class_entries(&m, EntryClass::Terminal), 1);
    assert_eq!(evictions(&m, "replaced"), 1);
    assert_eq!(evictions(&m, "purged"), 0);
    assert_eq!(gauges(&m), c.stats());
}

#[test]
fn size_evictions_keep_the_gauges_exact() {
    let m = CacheMetrics::default();
    let cap = 1 << 20;
    let c = Cache::new(cap, Duration::from_secs(30), m.clone());
    for n in 0..5000 {
        let class = match n % 5 {
            0 => RUNNING,
            1 => NOT_FOUND,
            _ => TERMINAL,
        };
        c.insert(key(n), stored(200 + (n as usize % 7) * 300, class, None));
        // Some keys answered again, as runs are polled.
        if n % 10 == 0 {
            c.insert(key(n / 2), stored(500, TERMINAL, None));
        }
    }
    // Heavier than the whole cap: never kept, counted as a size eviction (not a replacement).
    let (size, replaced) = (evictions(&m, "size"), evictions(&m, "replaced"));
    c.insert(key(1 << 40), stored(cap as usize, TERMINAL, None));
    assert!(c.get(&key(1 << 40)).is_none());
    assert_eq!(evictions(&m, "size"), size + 1);
    assert_eq!(evictions(&m, "replaced"), replaced);
    let s = c.stats();
    assert!(s.weighted_bytes <= cap, "{s:?}");
    assert!(evictions(&m, "size") > 1000);
    assert_eq!(gauges(&m), s);
}

#[test]
fn remove_clear_and_replace_are_counted() {
    let m = CacheMetrics::default();
    let c = Cache::new(1 << 20, Duration::from_secs(30), m.clone());
    c.insert(key(1), stored(10, TERMINAL, None));
    c.insert(key(1), stored(30, TERMINAL, None));
    c.insert(key(2), stored(10, RUNNING, Some(Duration::from_secs(10))));
    c.insert(key(2), stored(30, RUNNING, Some(Duration::from_secs(10))));
    assert_eq!(c.get(&key(1)).unwrap().body.len(), 30);
    assert_eq!(c.stats().entries, 2);
    assert_eq!(evictions(&m, "replaced"), 2);
    assert_eq!(gauges(&m), c.stats());

    c.remove(&key(1));
    c.remove(&key(2));
    c.remove(&key(3));
    assert!(c.lookup(&key(1)).is_none() && c.lookup(&key(2)).is_none());
    assert_eq!(evictions(&m, "purged"), 2);
    assert_eq!(gauges(&m), c.stats());

    for n in 10..20 {
        let class = if n < 15 { TERMINAL } else { NOT_FOUND };
        c.insert(key(n), stored(10, class, Some(Duration::from_secs(10))));
    }
    c.clear();
    assert_eq!(c.stats().entries, 0);
    assert_eq!(evictions(&m, "purged"), 12);
    assert_eq!(evictions(&m, "size") + evictions(&m, "expired"), 0);
    assert_eq!(gauges(&m), c.stats());
}

#[test]
fn the_largest_answer_the_upstream_client_accepts_is_kept() {
    for (max_bytes, largest) in [(256u64 << 20, 16u64 << 20), (1 << 30, 64 << 20)] {
        let m = CacheMetrics::default();
        let c = Cache::with_largest_body(max_bytes, largest, Duration::ZERO, m.clone());
        c.insert(key(1), stored(largest as usize, TERMINAL, None));
        assert!(
            c.get(&key(1)).is_some(),
            "a {largest}-byte body in a {max_bytes}-byte cache"
        );
        assert_eq!(gauges(&m), c.stats());
    }
}
