//! The benchmarks' ceiling: a bare hyper 1 server that answers every request with one run body
//! held in memory.
//!
//! Invariant: it does nothing a cache hit could avoid — no routing, no id parsing, no cache, no
//! logging — and otherwise serves like the gateway: a tokio multi-thread runtime (worker count
//! from `TOKIO_WORKER_THREADS` or the CPUs it may run on), hyper-util's auto builder (HTTP/1.1
//! and HTTP/2), `TCP_NODELAY`, keep-alive. The body is the mock Dify's terminal run body of the
//! same output size, so the bytes on the wire match a gateway hit.
//!
//! ```text
//! cargo run --release --example bare-hyper -- 127.0.0.1:8090 [OUTPUT_BYTES] [plain|gateway-like] [BODIES] [HOLD_MS]
//! ```
//!
//! With `BODIES` > 1 it keeps that many separate copies of the body and picks one by a hash of
//! the request path, so that, like a cache serving many runs, each request may touch memory the
//! previous one did not (the ceiling for the many-runs scenario).
//!
//! With `gateway-like` it also takes the gateway's per-connection settings (hyper timer,
//! header-read timeout, header-size cap, HTTP/2 limits) and sends the headers of a gateway hit
//! (`x-version`, `x-env`, `x-cache`, `age`), so that what remains between it and the gateway is
//! the gateway's own request handling.
//!
//! With `HOLD_MS` > 0 the first request for a path starts a `HOLD_MS` timer, and every request
//! for that path arriving before it fires waits for it; all are released by one wake-up, as a
//! single flight releases its waiters; later requests are answered at once. It is the ceiling for
//! the stampede: how soon a thousand held connections can all be answered on this machine.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_TYPE};
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Output text per body when no size is given: the mock Dify's default.
const DEFAULT_OUTPUT_BYTES: usize = 1024;

/// A fixed run id for the body (the bytes matter, not the id).
const RUN: &str = "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10";

/// The headers a gateway hit adds, for `gateway-like`.
static X_VERSION: HeaderName = HeaderName::from_static("x-version");
static X_ENV: HeaderName = HeaderName::from_static("x-env");
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let output_bytes = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_OUTPUT_BYTES);
    let gateway_like = args.next().as_deref() == Some("gateway-like");
    let copies: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let hold = Duration::from_millis(args.next().and_then(|s| s.parse().ok()).unwrap_or(0));
    let body = dify_gateway::mock::run_body(RUN, "\"succeeded\"", output_bytes);
    let bodies: Arc<[Bytes]> = (0..copies).map(|_| Bytes::copy_from_slice(&body)).collect();
    // Same runtime construction as the gateway's binary.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(addr, bodies, gateway_like, hold))
}

/// The gateway's protocol settings (`server.rs`, with its default config).
fn gateway_protocol(b: &mut auto::Builder<TokioExecutor>) {
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(16384)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(16384)
        .max_concurrent_streams(256);
}

/// FNV-1a of the path: a cheap, stable pick among the copies.
fn pick(path: &str, n: usize) -> usize {
    let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % n as u64) as usize
}

/// Per path, the release of the requests held for it (`HOLD_MS`).
type Holds = Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>;

/// Waits until the hold for `path` is released, starting it if this is the path's first request.
async fn held(holds: &Holds, path: &str, hold: Duration) {
    let mut rx = {
        let mut map = holds.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(path) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(false);
                map.insert(path.to_owned(), rx.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    let _ = tx.send(true);
                    // Keep the sender: a closed channel would make later waits fail.
                    std::future::pending::<()>().await;
                });
                rx
            }
        }
    };
    let _ = rx.wait_for(|released| *released).await;
}

async fn serve(
    addr: String,
    bodies: Arc<[Bytes]>,
    gateway_like: bool,
    hold: Duration,
) -> std::io::Result<()> {
    let holds: Holds = Arc::default();
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "bare hyper on {} ({} body bytes)",
        listener.local_addr()?,
        bodies[0].len()
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if gateway_like {
        gateway_protocol(&mut builder);
    }
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let bodies = Arc::clone(&bodies);
        let holds = Arc::clone(&holds);
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let wait = (!hold.is_zero()).then(|| {
                let (holds, path) = (Arc::clone(&holds), req.uri().path().to_owned());
                async move { held(&holds, &path, hold).await }
            });
            let body = match bodies.len() {
                1 => bodies[0].clone(),
                n => bodies[pick(req.uri().path(), n)].clone(),
            };
            let mut resp = Response::new(Full::new(body));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if gateway_like {
                h.insert(X_VERSION.clone(), HeaderValue::from_static("1.9.2"));
                h.insert(X_ENV.clone(), HeaderValue::from_static("PRODUCTION"));
                h.insert(X_CACHE.clone(), HeaderValue::from_static("HIT"));
                h.insert(AGE, HeaderValue::from_static("0"));
            }
            async move {
                if let Some(w) = wait {
                    w.await;
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
