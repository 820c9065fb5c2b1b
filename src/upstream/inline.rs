//! Upstream GETs over HTTP/1.1 connections driven by the request that uses them: no connection
//! task and no channel hop between a fetch and its socket, so a miss costs one task, as a
//! proxy's own connection would.
//!
//! Invariant: a connection is in the idle list only while no request holds it, after an
//! exchange that ended cleanly (the whole answer read, hyper ready for the next request), for
//! at most `pool_idle_timeout` since it was last used, and at most `pool_max_idle_per_host` of
//! them; a request holds its connection from checkout until its answer's body is read and polls
//! it itself. A connection whose exchange did not end cleanly (an error, a cap, a timeout, a
//! cancelled fetch) is closed, never reused. A request that finds its reused connection closed
//! by the upstream before any answer is sent once more on a new one (a GET is idempotent). If
//! the upstream picks HTTP/2 by ALPN, the pool stands aside for good and the multiplexing
//! client serves its requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::connect::connect_failed;
use super::UpstreamError;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Body = Empty<Bytes>;

/// One HTTP/1.1 connection: the handle requests are sent with, and the state machine that
/// moves them over the socket when polled. Boxed wherever it goes: with a TLS session inside,
/// it is too large to copy on every checkout and checkin.
struct Conn {
    send: http1::SendRequest<Body>,
    driver: http1::Connection<Io, Body>,
}

impl Conn {
    /// Polls the connection once without a waker to keep: it reads an end the upstream sent
    /// (or finishes the answer just read) and leaves no task behind in the socket's wakers.
    /// True if it can take a request now.
    fn settle(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.driver).poll(&mut cx) {
            Poll::Ready(_) => false,
            Poll::Pending => self.send.is_ready(),
        }
    }
}

/// An idle connection and when it was last used.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The per-app pool of request-driven connections.
#[derive(Clone)]
pub(super) struct InlinePool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream, what the connector dials.
    origin: Uri,
    /// The `Host` header every request carries (the authority, without a default port).
    host: HeaderValue,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// The upstream answered a connect with HTTP/2: every request goes to the multiplexing client.
    multiplexed: AtomicBool,
    /// A task closes idle connections past their time while there are any.
    reaping: AtomicBool,
}

/// What [`InlinePool::send`] did with a request.
pub(super) enum Sent {
    /// The answer's head, and the connection its body is read through.
    Answer(Response<Incoming>, Lease),
    /// The upstream speaks HTTP/2: the request, untouched, is for the multiplexing client.
    Multiplexed(Request<Body>),
}

impl InlinePool {
    /// A pool dialling `base`'s scheme and authority with `connector`.
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        base: &Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Option<InlinePool> {
        let authority = base.authority()?;
        let scheme = base.scheme()?;
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        let default_port = match scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => authority.as_str().to_owned(),
            _ => authority.host().to_owned(),
        };
        Some(InlinePool {
            inner: Arc::new(Inner {
                connector,
                origin,
                host: HeaderValue::from_str(&host).ok()?,
                idle: Mutex::new(Vec::new()),
                max_idle,
                idle_timeout,
                multiplexed: AtomicBool::new(false),
                reaping: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `req` (an absolute URI on this pool's origin) on an idle connection, or a new one,
    /// and drives it until the answer's head is in. `base` names the upstream in a connect
    /// failure's log line.
    pub(super) async fn send(
        &self,
        mut req: Request<Body>,
        base: &str,
    ) -> Result<Sent, UpstreamError> {
        if self.inner.multiplexed.load(Ordering::Relaxed) {
            return Ok(Sent::Multiplexed(req));
        }
        // HTTP/1.1 carries the origin form and a Host header.
        let path = req.uri().path_and_query().cloned();
        let origin_form =
            Uri::from(path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        let absolute = std::mem::replace(req.uri_mut(), origin_form);
        req.headers_mut().insert(HOST, self.inner.host.clone());

        if let Some(conn) = self.checkout() {
            // Sent again on a new connection if the upstream closed this one before answering.
            let retry = clone_request(&req);
            match Lease::new(self, conn).exchange(req).await {
                Ok(sent) => return Ok(sent),
                Err(Failed::Closed(e)) => {
                    tracing::debug!(error = %e, "idle upstream connection was closed; sending again")
                }
                Err(Failed::Other(e)) => return Err(e),
            }
            req = retry;
        }
        // Boxed: a new connection is the rare case, and its handshake (a TLS session inside)
        // would otherwise size every exchange's future, which is moved whole on each miss.
        let conn = match Box::pin(self.connect(base)).await? {
            Some(conn) => conn,
            None => {
                *req.uri_mut() = absolute;
                req.headers_mut().remove(HOST);
                return Ok(Sent::Multiplexed(req));
            }
        };
        match Lease::new(self, conn).exchange(req).await {
            Ok(sent) => Ok(sent),
            Err(Failed::Closed(e) | Failed::Other(e)) => Err(e),
        }
    }

    /// The most recently used idle connection that is still open and within its idle time.
    fn checkout(&self) -> Option<Box<Conn>> {
        let now = Instant::now();
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut i) = idle.pop() {
            if now.duration_since(i.since) < self.inner.idle_timeout && i.conn.settle() {
                return Some(i.conn);
            }
        }
        None
    }

    /// A new connection, or `None` if the upstream chose HTTP/2 (from now on, every request
    /// goes to the multiplexing client).
    async fn connect(&self, base: &str) -> Result<Option<Box<Conn>>, UpstreamError> {
        let mut connector = self.inner.connector.clone();
        let io = connector
            .call(self.inner.origin.clone())
            .await
            .map_err(|e| connect_failed(&*e, base))?;
        if io.connected().is_negotiated_h2() {
            tracing::debug!(
                upstream = base,
                "upstream negotiated HTTP/2; its GETs use the multiplexing client"
            );
            self.inner.multiplexed.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        let (send, driver) = http1::handshake(io).await.map_err(|e| {
            tracing::debug!(error = %e, "upstream HTTP/1.1 handshake failed");
            UpstreamError::Protocol
        })?;
        Ok(Some(Box::new(Conn { send, driver })))
    }

    /// Files a connection that ended its exchange cleanly as idle, or closes it.
    fn checkin(&self, mut conn: Box<Conn>) {
        if !conn.settle() {
            return;
        }
        let now = Instant::now();
        let start_reaper = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= self.inner.max_idle {
                // The least recently used goes (closed outside the lock, when dropped).
                if idle.is_empty() {
                    return;
                }
                drop(idle.remove(0));
            }
            idle.push(Idle { conn, since: now });
            !self.inner.reaping.swap(true, Ordering::Relaxed)
        };
        if start_reaper {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(&self.inner)));
            } else {
                self.inner.reaping.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// Closes idle connections past their idle time or closed by the upstream, every half idle
/// time, until none is left (or the pool is gone).
async fn reap(pool: Weak<Inner>) {
    loop {
        let period = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        let now = Instant::now();
        let closed: Vec<Idle> = {
            let mut idle = p.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut closed = Vec::new();
            let mut kept = Vec::with_capacity(idle.len());
            for mut i in idle.drain(..) {
                if now.duration_since(i.since) < p.idle_timeout && i.conn.settle() {
                    kept.push(i);
                } else {
                    closed.push(i);
                }
            }
            *idle = kept;
            if idle.is_empty() {
                p.reaping.store(false, Ordering::Relaxed);
                drop(idle);
                drop(closed);
                return;
            }
            closed
        };
        drop(closed);
    }
}

/// A GET without a body, copied for a second try.
fn clone_request(req: &Request<Body>) -> Request<Body> {
    let mut r = Request::new(Empty::new());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

/// Why an exchange on a connection failed.
enum Failed {
    /// The connection ended before any answer: a reused one may have been closed by the
    /// upstream while idle.
    Closed(UpstreamError),
    Other(UpstreamError),
}

/// A connection held by one request, which drives it; closed when dropped unless
/// [`Lease::release`]d after a clean exchange.
pub(super) struct Lease {
    pool: InlinePool,
    conn: Option<Box<Conn>>,
}

impl Lease {
    fn new(pool: &InlinePool, conn: Box<Conn>) -> Lease {
        Lease {
            pool: pool.clone(),
            conn: Some(conn),
        }
    }

    async fn exchange(mut self, req: Request<Body>) -> Result<Sent, Failed> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failed::Other(UpstreamError::Protocol));
        };
        let answer = conn.send.send_request(req);
        match self.drive(answer).await {
            Ok(Ok(resp)) => Ok(Sent::Answer(resp, self)),
            Ok(Err(e)) if e.is_canceled() || e.is_incomplete_message() => {
                Err(Failed::Closed(protocol(&e)))
            }
            Ok(Err(e)) => Err(Failed::Other(protocol(&e))),
            Err(Ended) => Err(Failed::Closed(UpstreamError::Protocol)),
        }
    }

    /// Runs `work` (the answer, or its body being read) while polling the connection that
    /// feeds it, on this task. `Err` if the connection ended first.
    pub(super) async fn drive<F: Future>(&mut self, work: F) -> Result<F::Output, Ended> {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Err(Ended));
            };
            let ended = Pin::new(&mut conn.driver).poll(cx).is_ready();
            // What the connection just read may have finished the work.
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if ended {
                // Nothing drives the work any more.
                self.conn = None;
                return Poll::Ready(Err(Ended));
            }
            Poll::Pending
        })
        .await
    }

    /// The exchange ended cleanly (the whole body read): the connection goes back to the pool.
    pub(super) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

/// The connection a [`Lease::drive`] polled ended before the work did.
#[derive(Debug)]
pub(super) struct Ended;

fn protocol(e: &hyper::Error) -> UpstreamError {
    tracing::debug!(error = %e, "upstream exchange failed");
    UpstreamError::Protocol
}

#[cfg(test)]
#[path = "inline_tests.rs"]
mod tests;
