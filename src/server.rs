//! The public listener: accepts connections and serves HTTP/1.1 and HTTP/2 on them.
//!
//! Invariant: at most `server.max_connections` connections are served at once; every connection
//! has a header-read deadline and a header-size cap; on shutdown the listener stops accepting at
//! once and open connections get `server.drain_timeout` to finish their in-flight requests.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::Admin;
use crate::config::ServerConfig;
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
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256);
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

/// Serves the admin routes on their own listener (few connections, same timeouts).
pub async fn run_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let cfg = ServerConfig {
        max_connections: ADMIN_MAX_CONNECTIONS,
        ..cfg.clone()
    };
    let handler = move |req: Request<Incoming>| {
        let admin = Arc::clone(&admin);
        async move { admin.handle(req).await }
    };
    serve(listener, &cfg, None, handler, shutdown).await
}

/// Connections the admin listener serves at once (scrapers and operators, not clients).
const ADMIN_MAX_CONNECTIONS: usize = 64;

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
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let builder = Arc::new(protocol(cfg));
    let header_timeout = cfg.header_read_timeout;
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let svc = service_fn(move |req| {
            let fut = h(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    // hyper's header timer starts only once bytes arrive; a client that
                    // connects and sends nothing is cut here instead.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => {
                            drop(permit);
                            return;
                        }
                    }
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(tls) => {
                    let Some(stream) = tls.accept(stream).await else {
                        drop(permit);
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "stopped accepting; draining"
    );
    match tokio::time::timeout(cfg.drain_timeout, graceful.shutdown()).await {
        Ok(()) => Drain::Complete,
        Err(_) => Drain::TimedOut,
    }
}
