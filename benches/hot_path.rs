//! Micro-benchmarks of the per-request work on the hit path, and of the policy's body check.
//!
//! Invariant: nothing here listens on a fixed port or leaves the process — the one upstream
//! exchange (to fill the cache for the hit benchmarks) goes to a [`MockDify`] on `127.0.0.1:0`
//! inside the benchmark's own runtime. Measurement times are short (2–3 s, 30 samples) so the
//! whole file runs in about a minute and a half.
//!
//! ```text
//! cargo bench --bench hot_path
//! ```
//!
//! Besides criterion's timings it prints the heap allocations one `Gateway::handle` hit makes,
//! with and without the access log, and with its body sent (polled to its end, as the server
//! does), counted by a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dify_gateway::access_log::AccessLog;
use dify_gateway::cache::{AppId, Cache, CacheKey, KeptHeaders, Stored};
use dify_gateway::config::{Config, LogFormat};
use dify_gateway::metrics::CacheMetrics;
use dify_gateway::mock::{run_body, MockDify, Reply};
use dify_gateway::policy::{EntryClass, Policy};
use dify_gateway::run_id::RunId;
use dify_gateway::Gateway;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::runtime::Runtime;

/// Counts every allocation, so the benchmark can report allocations per request.
struct CountingAlloc;

/// Allocations made since the start of the process.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The app key the mock expects.
const KEY: &str = "app-bench-0123456789";

/// The run the hit benchmarks ask for.
const RUN: &str = "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10";

/// Short runs: the suite is meant to be rerun often, not to resolve nanoseconds.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

fn run_id(c: &mut Criterion) {
    let mut g = c.benchmark_group("run_id");
    g.bench_function("parse_lowercase", |b| {
        b.iter(|| RunId::parse(black_box(RUN)))
    });
    let upper = RUN.to_ascii_uppercase();
    g.bench_function("parse_uppercase", |b| {
        b.iter(|| RunId::parse(black_box(&upper)))
    });
    let id = RunId::parse(RUN).expect("valid id");
    g.bench_function("canonical_text", |b| {
        b.iter(|| {
            let mut buf = [0u8; 36];
            black_box(black_box(id).encode(&mut buf).len())
        })
    });
    g.bench_function("parse_reject", |b| {
        b.iter(|| RunId::parse(black_box("..%2F..%2Fworkflows%2Flogs%2F%2e%2e%2e")))
    });
    g.finish();
}

fn policy(c: &mut Criterion) {
    let cfg = Config::for_upstream("http://127.0.0.1:1/v1", KEY).expect("config");
    let policy = Policy::new(&cfg.cache);
    let mut g = c.benchmark_group("policy_decide");
    g.measurement_time(Duration::from_secs(3));
    for (name, n) in [("1KB", 1 << 10), ("100KB", 100 << 10), ("2MB", 2 << 20)] {
        for status in ["\"succeeded\"", "\"running\""] {
            let body = run_body(RUN, status, n);
            g.throughput(Throughput::Bytes(body.len() as u64));
            let label = format!("{}/{}", name, status.trim_matches('"'));
            g.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
                b.iter(|| policy.decide(StatusCode::OK, black_box(body)))
            });
        }
    }
    g.finish();
}

fn stored(body: Bytes) -> Arc<Stored> {
    Arc::new(Stored {
        status: StatusCode::OK,
        headers: Arc::new(KeptHeaders {
            content_type: Some(HeaderValue::from_static("application/json")),
            x_version: Some(HeaderValue::from_static("1.9.2")),
            x_env: Some(HeaderValue::from_static("PRODUCTION")),
            retry_after: None,
        }),
        etag: dify_gateway::cache::etag_of(&body),
        body,
        class: Some(EntryClass::Terminal),
        ttl: None,
        fetched_at: Instant::now(),
    })
}

fn cache(c: &mut Criterion) {
    let cache = Cache::new(256 << 20, Duration::ZERO, CacheMetrics::default());
    let key = |n: u128| CacheKey {
        app: AppId(0),
        run: RunId::from(uuid::Uuid::from_u128(n)),
    };
    let body = run_body(RUN, "\"succeeded\"", 1024);
    for n in 0..10_000 {
        cache.insert(key(n), stored(body.clone()));
    }
    cache.stats();
    let mut g = c.benchmark_group("cache");
    g.bench_function("get_hit_one_key", |b| {
        b.iter(|| cache.get(black_box(&key(7))))
    });
    let mut n = 0u128;
    g.bench_function("get_hit_10k_keys", |b| {
        b.iter(|| {
            n = (n + 7919) % 10_000;
            cache.get(black_box(&key(n)))
        })
    });
    g.bench_function("get_miss", |b| {
        b.iter(|| cache.get(black_box(&key(1 << 40))))
    });
    g.finish();
}

/// A gateway in front of a mock on `127.0.0.1:0`, with [`RUN`] fetched once so it is cached.
fn hit_gateway(rt: &Runtime, access_log: Option<Arc<AccessLog>>) -> Arc<Gateway> {
    rt.block_on(async {
        let mock = MockDify::start(KEY).await.expect("mock starts");
        mock.set(RUN, Reply::run(RUN, "\"succeeded\""));
        let mut cfg = Config::for_upstream(&mock.base_url(), KEY).expect("config");
        cfg.log.access_log = access_log.is_some();
        let gw = Gateway::with_access_log(&cfg, access_log).expect("gateway");
        let first = gw.handle(request()).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()["x-cache"], "MISS");
        let second = gw.handle(request()).await;
        assert_eq!(second.headers()["x-cache"], "HIT");
        assert_eq!(mock.total(), 1);
        gw
    })
}

fn request() -> Request<Empty<Bytes>> {
    Request::get(concat!(
        "/v1/workflows/run/",
        "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10"
    ))
    .body(Empty::new())
    .expect("valid request")
}

/// A request for a malformed run id (answered 400 without a lookup).
fn bad_id_request() -> Request<Empty<Bytes>> {
    Request::get("/v1/workflows/run/not-a-uuid")
        .body(Empty::new())
        .expect("valid request")
}

/// Time of `iters` calls of `gw.handle` on requests from `make`, request building included.
fn handle_many(
    rt: &Runtime,
    gw: &Arc<Gateway>,
    make: fn() -> Request<Empty<Bytes>>,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(gw.handle(make()).await);
        }
        t.elapsed()
    })
}

/// A text access log drained by a thread that discards the batches, as the binary's log thread
/// does minus the write to stdout: what formatting and queueing the line costs, without the I/O.
fn drained_access_log() -> Arc<AccessLog> {
    let log = Arc::new(AccessLog::new(LogFormat::Text));
    let drained = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut batch = Vec::new();
        loop {
            drained.take(&mut batch, Duration::from_millis(200));
            batch.clear();
        }
    });
    log
}

/// `gw.handle` of `req` with the answer's body polled to its end, as the server sends it.
async fn handle_and_send(gw: &Arc<Gateway>, req: Request<Empty<Bytes>>) {
    let mut body = gw.handle(req).await.into_body();
    while let Some(frame) = body.frame().await {
        black_box(frame.ok());
    }
}

/// Time of `iters` hits with their bodies sent, request building included.
fn handle_and_send_many(rt: &Runtime, gw: &Arc<Gateway>, iters: u64) -> Duration {
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..iters {
            handle_and_send(gw, request()).await;
        }
        t.elapsed()
    })
}

/// Heap allocations per hit with its body sent, averaged over many calls.
fn allocations_per_sent_hit(rt: &Runtime, gw: &Arc<Gateway>) -> f64 {
    const N: u64 = 10_000;
    rt.block_on(async {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..N {
            handle_and_send(gw, request()).await;
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
    })
}

/// Heap allocations per `handle` hit, averaged over many calls.
fn allocations_per_hit(rt: &Runtime, gw: &Arc<Gateway>) -> f64 {
    const N: u64 = 10_000;
    rt.block_on(async {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..N {
            black_box(gw.handle(request()).await);
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
    })
}

fn gateway(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let quiet = hit_gateway(&rt, None);
    let logged = hit_gateway(&rt, Some(drained_access_log()));

    let base = {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            black_box(request());
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0
    };
    println!("allocations per request built by the benchmark: {base:.1}");
    println!(
        "allocations per handle() hit, access log off: {:.1}",
        allocations_per_hit(&rt, &quiet)
    );
    println!(
        "allocations per handle() hit, access log on (text, batches discarded): {:.1}",
        allocations_per_hit(&rt, &logged)
    );

    println!(
        "allocations per hit with its body sent, access log off: {:.1}",
        allocations_per_sent_hit(&rt, &quiet)
    );

    let mut g = c.benchmark_group("gateway_hit");
    g.bench_function("build_request_only", |b| b.iter(request));
    g.bench_function("handle_access_log_off", |b| {
        b.iter_custom(|iters| handle_many(&rt, &quiet, request, iters))
    });
    g.bench_function("handle_access_log_on_text", |b| {
        b.iter_custom(|iters| handle_many(&rt, &logged, request, iters))
    });
    g.bench_function("handle_and_send_body_access_log_off", |b| {
        b.iter_custom(|iters| handle_and_send_many(&rt, &quiet, iters))
    });
    g.bench_function("handle_bad_id_400", |b| {
        b.iter_custom(|iters| handle_many(&rt, &quiet, bad_id_request, iters))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = run_id, policy, cache, gateway
}
criterion_main!(benches);
