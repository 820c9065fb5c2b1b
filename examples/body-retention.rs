//! How much memory a kept upstream body really holds: fetches runs through the gateway's own
//! upstream client ([`Upstream::fetch_run`]) from an in-process mock Dify and keeps every body,
//! as the cache does, then reports resident memory per kept body beyond its length.
//!
//! Invariant: the only difference between the two modes is what is kept — `as-received` keeps
//! the `Bytes` the client returned, `copied` keeps an exact-size copy (what `cache/fetch.rs`
//! keeps) — so the difference in RSS per body is what the received `Bytes` pin beyond their length.
//!
//! A third mode, `cache`, skips the network: it inserts exact-size bodies of the same length
//! into the gateway's [`Cache`] as terminal entries and reports RSS per entry beyond the body —
//! the cache's own per-entry cost (the terminal store's slots, key, `Arc<Stored>`, kept headers,
//! allocator).
//!
//! ```text
//! cargo run --release --example body-retention -- as-received 20000 1600
//! cargo run --release --example body-retention -- copied 20000 1600
//! cargo run --release --example body-retention -- cache 100000 1600
//! ```

use std::time::Duration;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dify_gateway::cache::{AppId, Cache, CacheKey, KeptHeaders, Stored};
use dify_gateway::config::Config;
use dify_gateway::metrics::CacheMetrics;
use dify_gateway::mock::{run_body, AutoRuns, MockDify};
use dify_gateway::policy::EntryClass;
use dify_gateway::run_id::RunId;
use dify_gateway::upstream::Upstream;

/// The app key the mock expects.
const KEY: &str = "app-retention-test";

/// Upstream fetches in flight at once, like concurrent misses.
const CONCURRENCY: u64 = 32;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "as-received".into());
    let count: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let output_bytes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1600);
    let copied = match mode.as_str() {
        "as-received" => false,
        "copied" => true,
        "cache" => {
            cache_only(count, output_bytes);
            return Ok(());
        }
        m => return Err(format!("mode must be as-received, copied or cache, not {m}").into()),
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock = MockDify::serve(
        listener,
        KEY,
        Some(AutoRuns {
            running_for: Duration::ZERO,
            output_bytes,
        }),
    );
    let cfg = Config::for_upstream(&mock.base_url(), KEY)?;
    let upstream = Upstream::new(&cfg.upstream, &cfg.apps[0])?;
    let id = |i: u64| {
        RunId::from(uuid::Uuid::from_u128(
            0x7000_0000_0000_4000_8000_0000_0000_0000 | i as u128,
        ))
    };

    // Warm the connection pool and the allocator before the baseline.
    for i in 0..CONCURRENCY {
        upstream
            .fetch_run(
                id(1 << 40 | i),
                None,
                upstream.deadline(),
                &upstream.credentials(),
            )
            .await?;
    }
    let before = rss_kb();
    let mut kept: Vec<Bytes> = Vec::with_capacity(count as usize);
    let vec_bytes = kept.capacity() * std::mem::size_of::<Bytes>();
    let mut next = 0;
    while next < count {
        let batch: Vec<_> = (next..(next + CONCURRENCY).min(count))
            .map(|i| {
                let up = upstream.clone();
                tokio::spawn(async move {
                    up.fetch_run(id(i), None, up.deadline(), &up.credentials())
                        .await
                })
            })
            .collect();
        for t in batch {
            let body = t.await??.body;
            kept.push(if copied {
                Bytes::copy_from_slice(&body)
            } else {
                body
            });
        }
        next += CONCURRENCY;
    }
    let after = rss_kb();
    let body_bytes: usize = kept.iter().map(Bytes::len).sum();
    let per =
        ((after - before) as f64 * 1024.0 - body_bytes as f64 - vec_bytes as f64) / count as f64;
    println!("mode={mode}");
    println!("bodies={count}");
    println!("mean_body_bytes={}", body_bytes / count as usize);
    println!("rss_before_kb={before}");
    println!("rss_after_kb={after}");
    println!("rss_per_body_beyond_its_length_bytes={per:.0}");
    Ok(())
}

/// Inserts `count` terminal entries with exact-size bodies into the gateway's cache (default
/// 256 MiB cap) and prints the RSS each costs beyond its body.
fn cache_only(count: u64, output_bytes: usize) {
    let cache = Cache::new(256 << 20, Duration::ZERO, CacheMetrics::default());
    let template = run_body(
        "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10",
        "\"succeeded\"",
        output_bytes,
    );
    let headers = Arc::new(KeptHeaders {
        content_type: Some(http::HeaderValue::from_static("application/json")),
        x_version: Some(http::HeaderValue::from_static("1.9.2")),
        x_env: Some(http::HeaderValue::from_static("PRODUCTION")),
        retry_after: None,
    });
    let before = rss_kb();
    for i in 0..count {
        let key = CacheKey {
            app: AppId(0),
            run: RunId::from(uuid::Uuid::from_u128(i as u128)),
        };
        cache.insert(
            key,
            Arc::new(Stored {
                status: http::StatusCode::OK,
                // Each entry its own exact-size allocation, as after a copy on insert.
                headers: headers.clone(),
                body: Bytes::copy_from_slice(&template),
                etag: dify_gateway::cache::etag_of(&template),
                class: Some(EntryClass::Terminal),
                ttl: None,
                fetched_at: Instant::now(),
            }),
        );
    }
    let stats = cache.stats();
    let after = rss_kb();
    let body_bytes = template.len() as u64 * count;
    println!("mode=cache");
    println!("entries_inserted={count}");
    println!("entries_kept={}", stats.entries);
    println!("body_bytes_per_entry={}", template.len());
    println!("rss_before_kb={before}");
    println!("rss_after_kb={after}");
    println!(
        "rss_per_entry_beyond_body_bytes={:.0}",
        ((after - before) as f64 * 1024.0
            - (body_bytes as f64 * stats.entries as f64 / count as f64))
            / stats.entries as f64
    );
}
