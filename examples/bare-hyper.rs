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
//! cargo run --release --example bare-hyper -- 127.0.0.1:8090 [OUTPUT_BYTES] [plain|gateway-like|proxy=URL] [BODIES] [HOLD_MS]
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
//!
//! With `proxy=http://HOST:PORT` it is the ceiling for the miss path instead: every request is
//! sent to that upstream (same path and query, `Authorization: Bearer $DIFY_API_KEY` in place
//! of the client's) through hyper-util's pooled client with the gateway's connector settings, the whole
//! answer is read into memory (the gateway must read it to classify it) and sent back with its
//! status and `content-type`. No routing, no id check, no cache, no classification, no log: what
//! the stack costs to proxy one request. `proxy-inline=http://HOST:PORT/PATH` does the same with
//! no upstream connection task and no pool: each client connection has its own upstream
//! connection, driven by the request's task while it uses it (the shape of an nginx worker) —
//! what the hops between tasks cost.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
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
    let mode = args.next().unwrap_or_default();
    let gateway_like = mode == "gateway-like";
    let proxy = mode.strip_prefix("proxy=").map(str::to_owned);
    let inline = mode.strip_prefix("proxy-inline=").map(str::to_owned);
    let copies: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let hold = Duration::from_millis(args.next().and_then(|s| s.parse().ok()).unwrap_or(0));
    let body = dify_gateway::mock::run_body(RUN, "\"succeeded\"", output_bytes);
    let bodies: Arc<[Bytes]> = (0..copies).map(|_| Bytes::copy_from_slice(&body)).collect();
    // Same runtime construction as the gateway's binary.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match (proxy, inline) {
        (Some(upstream), _) => runtime.block_on(serve_proxy(addr, upstream)),
        (_, Some(upstream)) => runtime.block_on(serve_proxy_inline(addr, upstream)),
        _ => runtime.block_on(serve(addr, bodies, gateway_like, hold)),
    }
}

/// The upstream client of the `proxy` mode: the gateway's connector settings (`TCP_NODELAY`,
/// keep-alive pool), plain HTTP.
type Upstream = Client<HttpConnector, Empty<Bytes>>;

/// Forwards one request to `base` and answers with the upstream's status, `content-type` and
/// whole body; 502 when the upstream cannot be reached.
async fn forward(
    up: &Upstream,
    base: &str,
    auth: &HeaderValue,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("{base}{pq}").parse() {
        Ok(u) => u,
        Err(_) => return status_only(StatusCode::BAD_REQUEST),
    };
    let mut out = Request::new(Empty::new());
    *out.uri_mut() = uri;
    out.headers_mut().insert(AUTHORIZATION, auth.clone());
    let Ok(resp) = up.request(out).await else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    let (parts, body) = resp.into_parts();
    let Ok(body) = body.collect().await else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    answer_with(&parts, body.to_bytes())
}

/// The proxies' answer: the upstream's status, its `content-type` and the whole body.
fn answer_with(parts: &http::response::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = parts.status;
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        answer.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    answer
}

/// The `Authorization` the proxies send upstream, from `DIFY_API_KEY`.
fn upstream_auth() -> std::io::Result<HeaderValue> {
    let key = std::env::var("DIFY_API_KEY").unwrap_or_default();
    HeaderValue::try_from(format!("Bearer {key}"))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// The proxies' server side: hyper-util's auto builder with the gateway's protocol settings.
fn proxy_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    gateway_protocol(&mut builder);
    builder
}

fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The `proxy` mode's accept loop: the gateway's protocol settings, one pooled upstream client.
async fn serve_proxy(addr: String, upstream: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "bare hyper proxy on {} to {upstream}",
        listener.local_addr()?
    );
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build(http);
    let base: Arc<str> = upstream.trim_end_matches('/').into();
    let auth = upstream_auth()?;
    let builder = proxy_builder();
    accept_loop(listener, builder, move || {
        let (client, base, auth) = (client.clone(), Arc::clone(&base), auth.clone());
        service_fn(move |req| {
            let (client, base, auth) = (client.clone(), Arc::clone(&base), auth.clone());
            async move { Ok::<_, Infallible>(forward(&client, &base, &auth, req).await) }
        })
    })
    .await
}

/// One upstream connection of `proxy-inline`: its handle and the connection itself, which the
/// request using it drives (no task of its own).
type Inline = (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Empty<Bytes>>,
);

/// `proxy-inline`: each client connection has its own upstream connection, driven by the
/// request's own task while the request uses it — no upstream connection task, no pool; the
/// shape of an nginx worker. Not a design for the gateway (a client connection would hold an
/// upstream one), a measure of what the hops between tasks cost.
async fn forward_inline(
    slot: &tokio::sync::Mutex<Option<Inline>>,
    upstream: std::net::SocketAddr,
    base_path: &str,
    auth: &HeaderValue,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let mut slot = slot.lock().await;
    if slot.as_ref().is_none_or(|(send, _)| send.is_closed()) {
        let Ok(stream) = tokio::net::TcpStream::connect(upstream).await else {
            return status_only(StatusCode::BAD_GATEWAY);
        };
        let _ = stream.set_nodelay(true);
        let Ok(pair) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            return status_only(StatusCode::BAD_GATEWAY);
        };
        *slot = Some(pair);
    }
    let Some((send, conn)) = slot.as_mut() else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::new(Empty::new());
    let Ok(uri) = format!("{base_path}{pq}").parse::<Uri>() else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    *out.uri_mut() = uri;
    out.headers_mut().insert(AUTHORIZATION, auth.clone());
    out.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_str(&upstream.to_string()).expect("an address is a header value"),
    );
    let sent = tokio::select! {
        r = send.send_request(out) => r.ok(),
        _ = &mut *conn => None,
    };
    let Some(resp) = sent else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    let (parts, body) = resp.into_parts();
    let collected = tokio::select! {
        b = body.collect() => b.ok(),
        _ = &mut *conn => None,
    };
    let Some(body) = collected else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    answer_with(&parts, body.to_bytes())
}

/// The `proxy-inline` mode's accept loop.
async fn serve_proxy_inline(addr: String, upstream: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&addr).await?;
    let url: Uri = upstream
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "host:port");
    let target: std::net::SocketAddr = url
        .authority()
        .ok_or_else(invalid)?
        .as_str()
        .parse()
        .map_err(|_| invalid())?;
    let base_path: Arc<str> = url.path().trim_end_matches('/').into();
    println!(
        "bare hyper proxy (upstream driven inline) on {} to {upstream}",
        listener.local_addr()?
    );
    let auth = upstream_auth()?;
    let builder = proxy_builder();
    accept_loop(listener, builder, move || {
        let slot = Arc::new(tokio::sync::Mutex::new(None));
        let (base_path, auth) = (Arc::clone(&base_path), auth.clone());
        service_fn(move |req| {
            let (slot, base_path, auth) = (Arc::clone(&slot), Arc::clone(&base_path), auth.clone());
            async move {
                Ok::<_, Infallible>(forward_inline(&slot, target, &base_path, &auth, req).await)
            }
        })
    })
    .await
}

/// Accepts connections until Ctrl-C (`TCP_NODELAY`, one task each), serving each with the
/// service `make` builds for it.
async fn accept_loop<S, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    mut make: impl FnMut() -> S,
) -> std::io::Result<()>
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = F,
        > + Send
        + 'static,
    F: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
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
        let conn = builder
            .serve_connection(TokioIo::new(stream), make())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
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
    accept_loop(listener, builder, move || {
        let bodies = Arc::clone(&bodies);
        let holds = Arc::clone(&holds);
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
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
        })
    })
    .await
}
