//! The soak's clients: a shared keep-alive pool, one GET with a deadline, the warm-up, and the
//! client loop that draws targets from the mix and tallies what came back.
//!
//! Invariant: every request a client makes ends within [`CLIENT_TIMEOUT`] and is tallied once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::gateway_process::HttpClient;
use crate::runs::{mix, Pools, Rng};
use crate::tally::{ClientError, Tally};

/// A client gives up on one request after this long (the gateway's own deadline is 2 s).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive client pool sized for `clients` concurrent users.
pub fn http_client(clients: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(clients.max(8))
        .build_http()
}

/// One GET: status, `X-Cache`, body; or the client-side error.
pub async fn fetch(
    client: &HttpClient,
    url: &str,
) -> Result<(u16, Option<String>, Bytes), ClientError> {
    let uri: http::Uri = url.parse().map_err(|_| ClientError::Other)?;
    let exchange = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| ClientError::classify(&e))?;
        let status = resp.status().as_u16();
        let x_cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::classify_chain(Some(&e)))?
            .to_bytes();
        Ok((status, x_cache, body))
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

/// Fetches every hot run once so later requests for them are hits.
pub async fn warm(client: &HttpClient, base: &str, pools: &Pools) -> Result<(), String> {
    for t in &pools.hot {
        let url = format!("{base}/v1/workflows/run/{}", t.id);
        match fetch(client, &url).await {
            Ok((200, _, body)) if body == t.good[0] => {}
            Ok((status, _, _)) => return Err(format!("warm-up of {} got {status}", t.id)),
            Err(e) => return Err(format!("warm-up of {} failed: {}", t.id, e.as_str())),
        }
    }
    Ok(())
}

/// How each client behaves.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Mean pause between requests.
    pub think_ms: u64,
    /// Requests on fault runs, per mille.
    pub fault_permille: u32,
}

/// One client: pick a target, request it, judge the answer, pause `think_ms` ± 50 %; until
/// `stop`.
pub async fn client_loop(
    pools: Arc<Pools>,
    client: HttpClient,
    base: Arc<str>,
    shape: Shape,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mix = mix(shape.fault_permille);
    let think_ms = shape.think_ms;
    let mut rng = Rng::seeded();
    let mut tally = Tally::default();
    // Spread the first requests over one think time.
    tokio::time::sleep(Duration::from_millis(rng.range(0, think_ms + 1))).await;
    while !stop.load(Ordering::Relaxed) {
        let t = pools.pick(&mix, &mut rng);
        let url = format!("{base}/v1/workflows/run/{}", t.id);
        match fetch(&client, &url).await {
            Ok((status, x_cache, body)) => {
                tally.response(&t.seen(), status, x_cache.as_deref(), &body)
            }
            Err(kind) => tally.error(t.category, kind),
        }
        let pause = rng.range(think_ms / 2, think_ms * 3 / 2 + 1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    tally
}
