//! The listeners: accept connections and serve HTTP/1.1 and HTTP/2 on them.
//!
//! Invariant: at most `max_connections` connections are served at once, and none keeps its slot
//! without making requests (deadlines and slot reuse in `connections.rs`); heads are capped
//! at `server.max_header_bytes`; on shutdown the listener stops accepting at once, connections
//! with nothing in flight are closed (HTTP/2 ones after a GOAWAY), and the others get
//! `server.drain_timeout` to finish their requests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::body::Body;
use crate::config::ServerConfig;
use crate::connections::{Admitted, CloseReason, Conn, Deadlines, Step, Table, Tracked};
use crate::gateway::Gateway;
use crate::tls::TlsAcceptor;

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the drain timeout.
    Complete,
    /// The drain timeout passed with connections still open; they were dropped.
    TimedOut,
}

/// Builds the per-connection protocol settings once.
fn protocol(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // Head deadlines are the connection driver's, for every protocol alike (hyper's own would
    // start only once the protocol sniff has finished).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(cfg.keep_alive_interval)
        .keep_alive_timeout(cfg.keep_alive_timeout);
    b
}

/// Serves `gateway` on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    cfg: &ServerConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let handler = move |req: Request<Incoming>| {
        let gw = Arc::clone(&gateway);
        async move { gw.handle(req).await }
    };
    serve(listener, cfg, tls, handler, shutdown).await
}

/// Serves the admin routes on their own listener: the public listener's deadlines, its own cap.
pub async fn run_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    cfg: &ServerConfig,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let cfg = ServerConfig {
        max_connections,
        ..cfg.clone()
    };
    let handler = move |req: Request<Incoming>| {
        let admin = Arc::clone(&admin);
        async move { admin.handle(req).await }
    };
    serve(listener, &cfg, None, handler, shutdown).await
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Drain
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(protocol(cfg));
    let deadlines = Deadlines::of(cfg);
    let table = Table::new(cfg.max_connections);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            // Reap finished connections so the set stays the size of the open ones.
            Some(_) = connections.join_next() => continue,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            a = table.admit() => a,
        };
        tune(&stream, cfg.tcp_keepalive);
        connections.spawn(connection(
            stream,
            peer,
            tls.clone(),
            Arc::clone(&builder),
            handler.clone(),
            admitted,
            deadlines,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracing::info!(
        connections = connections.len(),
        "stopped accepting; draining"
    );
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => Drain::Complete,
        // Dropping the set drops the connections still open.
        Err(_) => Drain::TimedOut,
    }
}

/// Socket options of an accepted connection.
fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    let Some(idle) = keepalive else { return };
    let ka = socket2::TcpKeepalive::new().with_time(idle);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "windows"
    ))]
    let ka = ka.with_interval(idle);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Serves one connection: the TLS handshake if any, then HTTP, under its deadlines.
#[allow(clippy::too_many_arguments)]
async fn connection<H, Fut>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: H,
    admitted: Admitted,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let conn = admitted.conn();
    let reason = match tls {
        None => {
            let io = TokioIo::new(stream);
            drive(io, &builder, handler, conn, &deadlines, &mut stop).await
        }
        Some(tls) => {
            let handshake = tokio::select! {
                s = tls.accept(stream) => s,
                _ = tokio::time::sleep_until(conn.first_request_deadline(&deadlines)) => {
                    return closed(peer, CloseReason::FirstRequestTimeout);
                }
                _ = conn.evicted() => return closed(peer, CloseReason::Evicted),
                _ = stop.wait_for(|s| *s) => return closed(peer, CloseReason::Shutdown),
            };
            match handshake {
                Some(s) => {
                    let io = TokioIo::new(s);
                    drive(io, &builder, handler, conn, &deadlines, &mut stop).await
                }
                None => CloseReason::Handshake,
            }
        }
    };
    closed(peer, reason);
    drop(admitted);
}

fn closed(peer: SocketAddr, reason: CloseReason) {
    tracing::debug!(%peer, reason = reason.as_str(), "connection closed");
}

/// Starts a graceful close and polls once, so an HTTP/2 client gets its GOAWAY before the
/// connection is dropped.
macro_rules! close_now {
    ($http:ident) => {{
        $http.as_mut().graceful_shutdown();
        let _ = $http.as_mut().now_or_never();
    }};
}

/// Runs HTTP on `io` until the client leaves or a deadline, an eviction or shutdown ends it.
async fn drive<I, H, Fut>(
    io: TokioIo<I>,
    builder: &auto::Builder<TokioExecutor>,
    handler: H,
    conn: &Arc<Conn>,
    deadlines: &Deadlines,
    stop: &mut watch::Receiver<bool>,
) -> CloseReason
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let tracker = Arc::clone(conn);
    let svc = service_fn(move |req| {
        let mut in_flight = tracker.request();
        let fut = handler(req);
        async move {
            // The request counts as in flight until hyper drops the body it has sent; an event
            // stream is bounded by its own timeouts instead of `max_response_time`.
            let resp = fut.await.map(|body| {
                if body.is_stream() {
                    in_flight.stream();
                }
                Tracked::new(body, in_flight)
            });
            Ok::<_, Infallible>(resp)
        }
    });
    let http = builder.serve_connection(io, svc);
    tokio::pin!(http);
    let mut closing: Option<(Instant, CloseReason)> = None;
    loop {
        let wake = match conn.next(Instant::now(), deadlines, closing) {
            Step::Wait(at) => at,
            Step::GoAway(why) => {
                http.as_mut().graceful_shutdown();
                closing = Some((Instant::now(), why));
                continue;
            }
            Step::Close(why) => {
                close_now!(http);
                return why;
            }
        };
        tokio::select! {
            biased;
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return closing.map_or(CloseReason::Ended, |(_, why)| why);
            }
            _ = stop.wait_for(|s| *s), if closing.is_none() => {
                http.as_mut().graceful_shutdown();
                closing = Some((Instant::now(), CloseReason::Shutdown));
            }
            _ = conn.evicted() => {
                if conn.is_quiet() {
                    close_now!(http);
                    return CloseReason::Evicted;
                }
                // A request arrived meanwhile: keep the slot.
                conn.keep();
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}
