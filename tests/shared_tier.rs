//! The shared tier against real `redis-server` processes on loopback.

#[path = "common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dify_gateway::cache::{KeptHeaders, Stored};
use dify_gateway::config::{Context, RawShared, SharedConfig};
use dify_gateway::policy::EntryClass;
use dify_gateway::run_id::RunId;
use dify_gateway::shared::{
    self, LockResult, LockToken, Lookup, NotifyOutcome, PutOutcome, ReleaseOutcome, SharedError,
    SharedTier, WaitOutcome,
};
use http::{HeaderValue, StatusCode};
use redis::Commands;
use redis_server::{RedisCluster, RedisServer};

const TAG: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const OTHER_TAG: &str = "ffffffffffffffffffffffffffffffff";

fn new_run() -> RunId {
    RunId::from(uuid::Uuid::new_v4())
}

fn config(urls: Vec<String>, cluster: bool, extra: &str) -> SharedConfig {
    let list = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    RawShared::from_toml(&format!("urls = [{list}]\ncluster = {cluster}\n{extra}"))
        .expect("test toml parses")
        .validate(&Context::standalone())
        .expect("test config validates")
}

fn tier(server: &RedisServer, extra: &str) -> SharedTier {
    SharedTier::new(config(vec![server.url()], false, extra)).expect("tier builds")
}

fn entry(body: Vec<u8>, class: EntryClass, ttl: Option<Duration>) -> Stored {
    Stored {
        status: StatusCode::OK,
        headers: Arc::new(KeptHeaders {
            content_type: Some(HeaderValue::from_static("application/json")),
            x_version: Some(HeaderValue::from_static("1.4.0")),
            x_env: Some(HeaderValue::from_static("PRODUCTION")),
            retry_after: None,
        }),
        etag: dify_gateway::cache::etag_of(&body),
        body: Bytes::from(body),
        class: Some(class),
        ttl,
        fetched_at: Instant::now(),
    }
}

fn terminal(body: &[u8]) -> Stored {
    entry(body.to_vec(), EntryClass::Terminal, None)
}

fn hit(l: Lookup) -> Arc<Stored> {
    match l {
        Lookup::Hit(s) => s,
        other => panic!("expected a hit, got {}", other.as_str()),
    }
}

/// Polls `f` until it is true or `within` passes; returns how long it took.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes the lock on `run`, which the test expects to be free.
async fn locked(t: &SharedTier, run: RunId, what: &str) -> LockToken {
    match t.try_lock(TAG, run).await {
        LockResult::Acquired(token) => token,
        other => panic!("{what}: {other:?}"),
    }
}

async fn subscribed(t: &SharedTier) {
    eventually(Duration::from_secs(5), "subscription up", || async {
        t.subscribed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_round_trips_including_a_5_mib_body() {
    let server = RedisServer::start();
    // A generous per-call timeout: the 5 MiB transfer in an unoptimised test build is the
    // point here, not latency.
    let t = tier(&server, "timeout = \"2s\"");
    let run = new_run();
    assert_eq!(t.get(TAG, run).await.as_str(), "miss");

    let small = terminal(br#"{"id":"x","status":"succeeded","outputs":{"a":"\u00e9\/"}}"#);
    assert_eq!(t.put(TAG, run, &small).await, PutOutcome::Written);
    let got = hit(t.get(TAG, run).await);
    assert_eq!(got.body, small.body);
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.class, Some(EntryClass::Terminal));
    assert_eq!(got.ttl, None);
    assert_eq!(got.headers.content_type, small.headers.content_type);
    assert_eq!(got.headers.x_version, small.headers.x_version);
    assert_eq!(got.headers.x_env, small.headers.x_env);
    assert!(got.fetched_at.elapsed() < Duration::from_secs(2));

    // Another app's view of the same run is separate.
    assert_eq!(t.get(OTHER_TAG, run).await.as_str(), "miss");

    let big_run = new_run();
    let body: Vec<u8> = (0..5 * 1024 * 1024)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let big = terminal(&body);
    assert_eq!(t.put(TAG, big_run, &big).await, PutOutcome::Written);
    let got = hit(t.get(TAG, big_run).await);
    assert_eq!(got.body.len(), body.len());
    assert!(got.body == big.body);

    let mut none = terminal(b"{}");
    none.class = None;
    assert_eq!(t.put(TAG, new_run(), &none).await, PutOutcome::NotKept);
    assert_eq!(t.stats().total(), 0, "{:?}", t.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_survives_the_trip_through_redis() {
    let server = RedisServer::start();
    let t = tier(&server, "");
    let run = new_run();
    let mut s = terminal(b"{}");
    s.fetched_at = Instant::now() - Duration::from_secs(42);
    assert_eq!(t.put(TAG, run, &s).await, PutOutcome::Written);
    let got = hit(t.get(TAG, run).await);
    let age = got.fetched_at.elapsed().as_secs();
    assert!((41..=43).contains(&age), "age {age}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_read_back_counts_from_when_the_upstream_answered() {
    let server = RedisServer::start();
    let t = tier(&server, "");
    let run = new_run();
    // A terminal run under `terminal_max_age`, written 4 s after the upstream answered.
    let mut s = entry(
        br#"{"status":"succeeded"}"#.to_vec(),
        EntryClass::Terminal,
        Some(Duration::from_secs(10)),
    );
    s.fetched_at = Instant::now() - Duration::from_secs(4);
    assert_eq!(t.put(TAG, run, &s).await, PutOutcome::Written);
    let got = hit(t.get(TAG, run).await);
    // Fresh until ~6 s from now, as in Redis: `fetched_at + ttl`, not `now + ttl`.
    let ttl = got.ttl.expect("a ttl");
    let left = ttl.saturating_sub(got.fetched_at.elapsed());
    assert!(ttl > Duration::from_secs(9), "{ttl:?}");
    assert!(
        left > Duration::from_secs(5) && left <= Duration::from_secs(6),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_entry_expires_with_its_ttl() {
    let server = RedisServer::start();
    let t = tier(&server, "");
    let run = new_run();
    let s = entry(
        br#"{"status":"running"}"#.to_vec(),
        EntryClass::Running,
        Some(Duration::from_millis(200)),
    );
    assert_eq!(t.put(TAG, run, &s).await, PutOutcome::Written);
    let pttl: i64 = server
        .raw()
        .pttl(format!("dify-gateway:v1:run:{{{TAG}:{run}}}"))
        .unwrap();
    assert!((1..=200).contains(&pttl), "PTTL {pttl}");
    let got = hit(t.get(TAG, run).await);
    assert_eq!(got.class, Some(EntryClass::Running));
    // The TTL handed back ends no later than Redis's copy, so a local copy expires no later.
    assert!(got.ttl.is_some_and(|d| d <= Duration::from_millis(200)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.get(TAG, run).await.as_str(), "miss");

    // An answer whose TTL ran out before it could be written is not written.
    let mut stale = s;
    stale.fetched_at = Instant::now() - Duration::from_millis(250);
    assert_eq!(t.put(TAG, run, &stale).await, PutOutcome::NotKept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_foreign_and_truncated_values_are_ignored_and_counted() {
    let server = RedisServer::start();
    let t = tier(&server, "");
    let mut raw = server.raw();
    let key = |run: RunId| format!("dify-gateway:v1:run:{{{TAG}:{run}}}");
    let valid = |tag: &str, run: RunId| {
        shared::encode(tag, run, &terminal(b"{\"status\":\"succeeded\"}"), 0).unwrap()
    };

    let planted: Vec<(&str, RunId, Vec<u8>)> = {
        let (a, b, c, d, e, f) = (
            new_run(),
            new_run(),
            new_run(),
            new_run(),
            new_run(),
            new_run(),
        );
        let mut truncated = valid(TAG, c);
        truncated.truncate(truncated.len() - 10);
        let mut flipped = valid(TAG, e);
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x20;
        vec![
            ("garbage", a, b"{\"status\":\"succeeded\"}".to_vec()),
            ("another app's value", b, valid(OTHER_TAG, b)),
            ("truncated", c, truncated),
            ("another run's value", d, valid(TAG, new_run())),
            ("flipped byte", e, flipped),
            ("empty", f, Vec::new()),
        ]
    };
    for (what, run, bytes) in &planted {
        let _: () = raw.set(key(*run), bytes).unwrap();
        assert_eq!(t.get(TAG, *run).await.as_str(), "miss", "{what}");
    }
    assert_eq!(t.stats().corrupt, planted.len() as u64);
    assert_eq!(t.stats().get(SharedError::Corrupt), planted.len() as u64);

    // A key of another type is not a crash either.
    let run = new_run();
    let _: () = raw.hset(key(run), "f", "v").unwrap();
    assert_eq!(t.get(TAG, run).await.as_str(), "unavailable");
    assert_eq!(t.stats().server, 1);

    // A put over a bad value repairs it.
    let (_, run, _) = &planted[0];
    assert_eq!(
        t.put(TAG, *run, &terminal(b"{}")).await,
        PutOutcome::Written
    );
    assert_eq!(hit(t.get(TAG, *run).await).body, Bytes::from_static(b"{}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_app_tag_is_refused_and_counted() {
    let server = RedisServer::start();
    let t = tier(&server, "");
    let run = new_run();
    assert_eq!(t.get("a{b}", run).await.as_str(), "unavailable");
    assert_eq!(
        t.put("", run, &terminal(b"{}")).await,
        PutOutcome::Unavailable
    );
    assert_eq!(t.try_lock("a b", run).await.as_str(), "unavailable");
    assert_eq!(t.stats().bad_tag, 3);
    assert!(shared::valid_app_tag(TAG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_contenders_one_gets_the_lock() {
    let server = RedisServer::start();
    let (a, b) = (tier(&server, ""), tier(&server, ""));
    let run = new_run();
    let (ra, rb) = tokio::join!(a.try_lock(TAG, run), b.try_lock(TAG, run));
    let (token, holder) = match (ra, rb) {
        (LockResult::Acquired(t), LockResult::Held) => (t, &a),
        (LockResult::Held, LockResult::Acquired(t)) => (t, &b),
        (x, y) => panic!(
            "expected one acquired and one held, got {} and {}",
            x.as_str(),
            y.as_str()
        ),
    };
    // Other runs and other apps are separate locks.
    assert!(matches!(
        a.try_lock(TAG, new_run()).await,
        LockResult::Acquired(_)
    ));
    assert!(matches!(
        a.try_lock(OTHER_TAG, run).await,
        LockResult::Acquired(_)
    ));
    assert!(matches!(b.try_lock(TAG, run).await, LockResult::Held));
    assert_eq!(holder.release(token).await, ReleaseOutcome::Released);
    let again = locked(&b, run, "the released lock can be taken").await;
    assert_eq!(b.release(again).await, ReleaseOutcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lock_that_expired_does_not_free_the_next_holder() {
    let server = RedisServer::start();
    let t = tier(&server, "lock_ttl = \"150ms\"\nwait_timeout = \"100ms\"");
    let run = new_run();
    let old = locked(&t, run, "first lock").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let new = locked(&t, run, "the expired lock can be taken").await;
    assert_eq!(t.release(old).await, ReleaseOutcome::Expired);
    assert!(matches!(t.try_lock(TAG, run).await, LockResult::Held));
    assert_eq!(t.release(new).await, ReleaseOutcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_notify_done_long_before_its_timeout() {
    let server = RedisServer::start();
    let (holder, waiter) = (tier(&server, ""), tier(&server, ""));
    subscribed(&waiter).await;
    let run = new_run();
    let token = locked(&holder, run, "holder locks").await;
    assert!(matches!(waiter.try_lock(TAG, run).await, LockResult::Held));

    let fetcher = {
        let holder = holder.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                holder.put(TAG, run, &terminal(b"{\"n\":1}")).await,
                PutOutcome::Written
            );
            assert_eq!(
                holder.notify_done(TAG, run, true).await,
                NotifyOutcome::Published
            );
            holder.release(token).await
        })
    };
    let start = Instant::now();
    let outcome = waiter.wait(TAG, run, Duration::from_secs(5)).await;
    let waited = start.elapsed();
    assert_eq!(outcome, WaitOutcome::Notified { stored: true });
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "woken after {waited:?}"
    );
    assert_eq!(
        hit(waiter.get(TAG, run).await).body,
        Bytes::from_static(b"{\"n\":1}")
    );
    assert_eq!(fetcher.await.unwrap(), ReleaseOutcome::Released);
    assert_eq!(waiter.waiting_runs(), 0, "the waiter unregistered");

    // Many local waiters on one run are all woken by one notification, with stored = false.
    let run = new_run();
    let token = locked(&holder, run, "holder locks").await;
    let waits: Vec<_> = (0..20)
        .map(|_| {
            let w = waiter.clone();
            tokio::spawn(async move { w.wait(TAG, run, Duration::from_secs(5)).await })
        })
        .collect();
    eventually(Duration::from_secs(2), "waiters registered", || async {
        waiter.waiting_runs() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        holder.notify_done(TAG, run, false).await,
        NotifyOutcome::Published
    );
    for w in waits {
        assert_eq!(w.await.unwrap(), WaitOutcome::Notified { stored: false });
    }
    assert_eq!(holder.release(token).await, ReleaseOutcome::Released);
}

/// `finish` publishes the completion and frees the lock in one call: a waiter on another
/// replica is woken with the stored flag and can take the lock at once; a holder whose lock
/// expired still tells the waiters but cannot free the next holder's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_wakes_the_waiters_and_frees_only_its_own_lock() {
    let server = RedisServer::start();
    let short = "lock_ttl = \"300ms\"\nwait_timeout = \"200ms\"";
    let (holder, waiter) = (tier(&server, short), tier(&server, ""));
    subscribed(&waiter).await;
    let run = new_run();
    let token = locked(&holder, run, "holder locks").await;
    assert!(matches!(waiter.try_lock(TAG, run).await, LockResult::Held));
    let wait = {
        let w = waiter.clone();
        tokio::spawn(async move { w.wait(TAG, run, Duration::from_secs(5)).await })
    };
    eventually(Duration::from_secs(2), "the waiter registered", || async {
        waiter.waiting_runs() == 1
    })
    .await;
    assert_eq!(
        holder.put(TAG, run, &terminal(b"{\"f\":1}")).await,
        PutOutcome::Written
    );
    assert_eq!(
        holder.finish(token, TAG, run, true).await,
        (NotifyOutcome::Published, ReleaseOutcome::Released)
    );
    assert_eq!(wait.await.unwrap(), WaitOutcome::Notified { stored: true });
    let next = locked(&waiter, run, "the finished lock is free").await;
    assert_eq!(waiter.release(next).await, ReleaseOutcome::Released);

    // An expired holder: the next holder's lock stays; the waiters are still told.
    let run = new_run();
    let old = locked(&holder, run, "first lock").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = locked(&waiter, run, "the expired lock can be taken").await;
    assert_eq!(
        holder.finish(old, TAG, run, false).await,
        (NotifyOutcome::Published, ReleaseOutcome::Expired)
    );
    assert!(matches!(holder.try_lock(TAG, run).await, LockResult::Held));
    assert_eq!(waiter.release(new).await, ReleaseOutcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_before_the_wait_is_not_missed() {
    let server = RedisServer::start();
    let (holder, waiter) = (tier(&server, ""), tier(&server, ""));
    subscribed(&waiter).await;
    // The holder finishes between the waiter's try_lock (Held) and its wait: the re-check
    // after registering sees it at once.
    let run = new_run();
    let token = locked(&holder, run, "holder locks").await;
    assert!(matches!(waiter.try_lock(TAG, run).await, LockResult::Held));
    assert_eq!(
        holder.put(TAG, run, &terminal(b"{}")).await,
        PutOutcome::Written
    );
    assert_eq!(
        holder.notify_done(TAG, run, true).await,
        NotifyOutcome::Published
    );
    assert_eq!(holder.release(token).await, ReleaseOutcome::Released);
    let start = Instant::now();
    assert_eq!(
        waiter.wait(TAG, run, Duration::from_secs(5)).await,
        WaitOutcome::Notified { stored: true }
    );
    assert!(start.elapsed() < Duration::from_secs(1));

    // Finished without a value (an upstream error): the lock is gone, so no wait either.
    let run = new_run();
    let token = locked(&holder, run, "holder locks").await;
    assert_eq!(holder.release(token).await, ReleaseOutcome::Released);
    let start = Instant::now();
    assert_eq!(
        waiter.wait(TAG, run, Duration::from_secs(5)).await,
        WaitOutcome::Notified { stored: false }
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_never_releases_blocks_nobody_beyond_the_lock_ttl() {
    let server = RedisServer::start();
    let extra = "lock_ttl = \"1s\"\nwait_timeout = \"400ms\"";
    let (holder, waiter) = (tier(&server, extra), tier(&server, extra));
    subscribed(&waiter).await;
    let run = new_run();
    let locked_at = Instant::now();
    let token = locked(&holder, run, "holder locks").await;
    // The holder "crashes": the token is forgotten, nothing is released or published.
    drop(token);
    drop(holder);

    let start = Instant::now();
    let max = waiter.config().wait_timeout;
    assert_eq!(waiter.wait(TAG, run, max).await, WaitOutcome::TimedOut);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(380) && waited < Duration::from_millis(1000),
        "timed out after {waited:?}"
    );

    let freed_after = eventually(Duration::from_secs(3), "lock expires", || async {
        match waiter.try_lock(TAG, run).await {
            LockResult::Acquired(t) => {
                let _ = waiter.release(t).await;
                true
            }
            _ => false,
        }
    })
    .await;
    let since_lock = locked_at.elapsed();
    assert!(
        since_lock >= Duration::from_millis(950) && since_lock < Duration::from_millis(2500),
        "lock freed {since_lock:?} after it was taken (polled {freed_after:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_is_not_an_outage_and_coming_back_is_noticed() {
    let mut server = RedisServer::start();
    let t = tier(&server, "timeout = \"100ms\"");
    subscribed(&t).await;
    let limit = 2 * t.config().timeout;
    let run = new_run();
    assert_eq!(t.put(TAG, run, &terminal(b"{}")).await, PutOutcome::Written);

    server.stop();
    // A waiter registered while the subscription is up is told it broke.
    let w = tokio::spawn({
        let t = t.clone();
        async move { t.wait(TAG, new_run(), Duration::from_secs(5)).await }
    });
    for round in 0..3 {
        let s = Instant::now();
        assert_eq!(
            t.get(TAG, run).await.as_str(),
            "unavailable",
            "round {round}"
        );
        assert!(s.elapsed() < limit, "get took {:?}", s.elapsed());
        let s = Instant::now();
        assert_eq!(
            t.put(TAG, run, &terminal(b"{}")).await,
            PutOutcome::Unavailable
        );
        assert!(s.elapsed() < limit, "put took {:?}", s.elapsed());
        let s = Instant::now();
        assert_eq!(t.try_lock(TAG, run).await.as_str(), "unavailable");
        assert!(s.elapsed() < limit, "try_lock took {:?}", s.elapsed());
        let s = Instant::now();
        assert_eq!(
            t.notify_done(TAG, run, true).await,
            NotifyOutcome::Unavailable
        );
        assert!(s.elapsed() < limit, "notify_done took {:?}", s.elapsed());
    }
    let s = Instant::now();
    assert!(t.ping().await.is_err());
    assert!(s.elapsed() < limit);
    let early = w.await.unwrap();
    assert!(
        matches!(early, WaitOutcome::Unavailable),
        "a wait across the outage ends as unavailable, got {early:?}"
    );
    eventually(
        Duration::from_secs(3),
        "subscription marked down",
        || async { !t.subscribed() },
    )
    .await;
    let s = Instant::now();
    assert_eq!(
        t.wait(TAG, run, Duration::from_secs(5)).await,
        WaitOutcome::Unavailable
    );
    assert!(s.elapsed() < limit);
    let stats = t.stats();
    assert!(
        stats.connection + stats.timeout >= 12,
        "failures are counted: {stats:?}"
    );

    server.restart();
    let back = eventually(Duration::from_secs(5), "commands work again", || async {
        t.put(TAG, run, &terminal(b"{\"back\":1}")).await == PutOutcome::Written
    })
    .await;
    assert_eq!(
        hit(t.get(TAG, run).await).body,
        Bytes::from_static(b"{\"back\":1}")
    );
    subscribed(&t).await;
    // Notifications flow again.
    let other = tier(&server, "");
    let run2 = new_run();
    let token = locked(&other, run2, "lock after restart").await;
    let wait = tokio::spawn({
        let t = t.clone();
        async move { t.wait(TAG, run2, Duration::from_secs(5)).await }
    });
    eventually(Duration::from_secs(2), "waiter registered", || async {
        t.waiting_runs() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        other.notify_done(TAG, run2, false).await,
        NotifyOutcome::Published
    );
    assert_eq!(wait.await.unwrap(), WaitOutcome::Notified { stored: false });
    assert_eq!(other.release(token).await, ReleaseOutcome::Released);
    eprintln!("commands worked again {back:?} after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_starts_without_redis() {
    let port = redis_server::free_port();
    let t = SharedTier::new(config(
        vec![format!("redis://127.0.0.1:{port}")],
        false,
        "timeout = \"100ms\"",
    ))
    .expect("no Redis is not a start-up error");
    let s = Instant::now();
    assert_eq!(t.get(TAG, new_run()).await.as_str(), "unavailable");
    assert!(s.elapsed() < Duration::from_millis(200));
    assert!(!t.subscribed());
    assert!(t.stats().total() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_one_value_and_purge_all_every_value_of_the_prefix() {
    let server = RedisServer::start();
    let t = tier(&server, "timeout = \"1s\"");
    let neighbour = tier(&server, "key_prefix = \"other-deployment:\"");
    let runs: Vec<RunId> = (0..1200).map(|_| new_run()).collect();
    for run in &runs {
        assert_eq!(
            t.put(TAG, *run, &terminal(b"{}")).await,
            PutOutcome::Written
        );
    }
    assert_eq!(
        t.put(OTHER_TAG, runs[0], &terminal(b"{}")).await,
        PutOutcome::Written
    );
    assert_eq!(
        neighbour.put(TAG, runs[0], &terminal(b"{}")).await,
        PutOutcome::Written
    );
    let token = locked(&t, runs[1], "lock").await;

    assert_eq!(t.purge(TAG, runs[0]).await, Ok(true));
    assert_eq!(t.purge(TAG, runs[0]).await, Ok(false));
    assert_eq!(t.get(TAG, runs[0]).await.as_str(), "miss");
    assert_eq!(t.get(OTHER_TAG, runs[0]).await.as_str(), "hit");

    assert_eq!(t.purge_all().await, Ok(1200));
    for run in runs.iter().step_by(97) {
        assert_eq!(t.get(TAG, *run).await.as_str(), "miss");
    }
    assert_eq!(t.get(OTHER_TAG, runs[0]).await.as_str(), "miss");
    assert_eq!(
        neighbour.get(TAG, runs[0]).await.as_str(),
        "hit",
        "another prefix is untouched"
    );
    assert_eq!(
        t.release(token).await,
        ReleaseOutcome::Released,
        "locks are left alone"
    );
    assert_eq!(t.purge_all().await, Ok(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_values_locks_and_notifications_working() {
    let cluster = RedisCluster::start(3);
    let cfg = config(cluster.urls(), true, "timeout = \"1s\"");
    let (a, b) = (
        SharedTier::new(cfg.clone()).expect("tier builds"),
        SharedTier::new(cfg).expect("tier builds"),
    );
    subscribed(&b).await;
    let runs: Vec<RunId> = (0..60).map(|_| new_run()).collect();
    for run in &runs {
        assert_eq!(
            a.put(TAG, *run, &terminal(run.to_string().as_bytes()))
                .await,
            PutOutcome::Written
        );
    }
    for run in &runs {
        assert_eq!(
            hit(b.get(TAG, *run).await).body,
            Bytes::from(run.to_string())
        );
    }
    // The values are spread over the nodes.
    let per_node: Vec<i64> = cluster
        .nodes
        .iter()
        .map(|n| redis::cmd("DBSIZE").query(&mut n.raw()).unwrap())
        .collect();
    assert!(per_node.iter().all(|n| *n > 0), "{per_node:?}");

    let run = new_run();
    let token = locked(&a, run, "lock").await;
    assert!(matches!(b.try_lock(TAG, run).await, LockResult::Held));
    let wait = tokio::spawn({
        let b = b.clone();
        async move { b.wait(TAG, run, Duration::from_secs(5)).await }
    });
    eventually(Duration::from_secs(2), "waiter registered", || async {
        b.waiting_runs() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.put(TAG, run, &terminal(b"{}")).await, PutOutcome::Written);
    // The publish inside `finish`'s script runs on the lock's node; the waiter's subscription
    // may be on another, and still hears it.
    assert_eq!(
        a.finish(token, TAG, run, true).await,
        (NotifyOutcome::Published, ReleaseOutcome::Released)
    );
    assert_eq!(wait.await.unwrap(), WaitOutcome::Notified { stored: true });

    assert_eq!(a.purge(TAG, runs[0]).await, Ok(true));
    assert_eq!(a.purge_all().await, Ok(runs.len() as u64));
    assert_eq!(b.get(TAG, runs[1]).await.as_str(), "miss");
    assert_eq!(a.stats().total(), 0, "{:?}", a.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_builds_its_tls_client_on_the_one_crypto_provider() {
    // A peer that accepts and hangs up: the client must get as far as building its rustls
    // config (which panics if the crypto provider is ambiguous), connect, and fail cleanly.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peer = tokio::spawn({
        let accepted = Arc::clone(&accepted);
        async move {
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(s);
            }
        }
    });
    let t = SharedTier::new(config(
        vec![format!("rediss://127.0.0.1:{port}")],
        false,
        "timeout = \"200ms\"",
    ))
    .expect("tier builds");
    eventually(
        Duration::from_secs(5),
        "a TLS attempt reached the peer",
        || async {
            t.get(TAG, new_run()).await.as_str() == "unavailable"
                && accepted.load(std::sync::atomic::Ordering::SeqCst) > 0
        },
    )
    .await;
    assert!(t.stats().total() >= 1);
    peer.abort();
}

/// The `[shared]` table of a gateway TOML file, validated.
fn shared_section(toml_text: &str) -> SharedConfig {
    let doc: toml::Table = toml_text.parse().expect("the deployment TOML parses");
    let shared = doc
        .get("shared")
        .expect("the deployment config has a [shared] table")
        .clone();
    let raw: RawShared = shared.try_into().expect("[shared] has only known keys");
    raw.validate(&Context::standalone())
        .expect("[shared] validates")
}

#[test]
fn the_deployment_configs_have_a_valid_shared_section() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("deploy/gateway.toml")).unwrap();
    let c = shared_section(&compose);
    assert_eq!(c.urls, ["redis://valkey:6379"]);

    // The ConfigMap embeds the TOML as a YAML block scalar indented by four spaces.
    let cm = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let (_, block) = cm
        .split_once("dify-gateway.toml: |\n")
        .expect("the ConfigMap holds dify-gateway.toml");
    let text: String = block
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let c = shared_section(&text);
    assert_eq!(c.urls, ["redis://valkey:6379"]);
    let doc: toml::Table = text.parse().unwrap();
    assert_eq!(
        doc["admin"]["listen"].as_str(),
        Some("0.0.0.0:9090"),
        "probes reach the admin listener from outside the pod"
    );
}
