//! How much memory a kept upstream body really holds: fetches runs through the gateway's own
//! upstream client ([`Upstream::fetch_run`]) from an in-process mock Dify and keeps every body,
//! as the cache does, then reports resident memory per kept body beyond its length.
//!
//! Invariant: the only difference between the two modes is what is kept — `as-received` keeps
//! the `Bytes` the client returned (what `gateway.rs` stores today), `copied` keeps an exact-size
//! copy — so the difference in RSS per body is what the received `Bytes` pin beyond their length.
//!
//! ```text
//! cargo run --release --example body-retention -- as-received 20000 1600
//! cargo run --release --example body-retention -- copied 20000 1600
//! ```

use std::time::Duration;

use bytes::Bytes;
use dify_gateway::config::Config;
use dify_gateway::mock::{AutoRuns, MockDify};
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
    let copied = match mode.as_str() {
        "as-received" => false,
        "copied" => true,
        m => return Err(format!("mode must be as-received or copied, not {m}").into()),
    };
    let count: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let output_bytes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1600);

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
    let upstream = Upstream::new(&cfg.upstream)?;
    let id = |i: u64| {
        RunId::from(uuid::Uuid::from_u128(
            0x7000_0000_0000_4000_8000_0000_0000_0000 | i as u128,
        ))
    };

    // Warm the connection pool and the allocator before the baseline.
    for i in 0..CONCURRENCY {
        upstream.fetch_run(id(1 << 40 | i), None).await?;
    }
    let before = rss_kb();
    let mut kept: Vec<Bytes> = Vec::with_capacity(count as usize);
    let vec_bytes = kept.capacity() * std::mem::size_of::<Bytes>();
    let mut next = 0;
    while next < count {
        let batch: Vec<_> = (next..(next + CONCURRENCY).min(count))
            .map(|i| {
                let up = upstream.clone();
                tokio::spawn(async move { up.fetch_run(id(i), None).await })
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
