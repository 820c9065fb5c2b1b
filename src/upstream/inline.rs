//! Upstream GETs over HTTP/1.1 connections driven by the request that uses them: no connection
//! task and no channel hop between a fetch and its socket, so a miss costs one task, as a
//! proxy's own connection would.
//!
//! Invariant: a connection is in the idle list only while no request holds it, after an
//! exchange that ended cleanly (the whole answer read, hyper ready for the next request), for
//! at most `pool_idle_timeout` since it was last used, and at most `pool_max_idle_per_host` of
//! them; a request holds its connection from checkout until its answer's body is read and polls
//! it itself. A connection whose exchange did not end cleanly (an error, a cap, a timeout, a
//! cancelled fetch) is closed, never reused. A GET that finds its reused connection closed or
//! reset by the upstream before any answer is sent once more on a new one (it is idempotent);
//! any other request only if hyper hands it back unsent. If
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
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::connect::connect_failed;
use super::{PassBody, UpstreamError};

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Every request body, a GET's empty one included (boxing a zero-sized body allocates nothing).
type B = PassBody;

/// One HTTP/1.1 connection: the handle requests are sent with, and the state machine that
/// moves them over the socket when polled. Boxed wherever it goes: with a TLS session inside,
/// it is too large to copy on every checkout and checkin.
struct Conn {
    send: http1::SendRequest<B>,
    driver: http1::Connection<Io, B>,
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

/// A request that can be built again, to be resent when its first sending may have been read
/// by a connection that then closed: only for idempotent requests.
pub(super) trait Rebuild {
    /// The request, as first built.
    fn build(&self) -> Request<B>;
}

/// No second sending: for requests that are not idempotent, or whose body streams.
/// Uninhabited: only `None::<&Once>` is ever passed.
pub(super) enum Once {}

impl Rebuild for Once {
    fn build(&self) -> Request<B> {
        match *self {}
    }
}

/// An idle connection and when it was last used.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The per-app pool of request-driven connections.
pub(super) struct InlinePool {
    inner: Arc<Inner>,
}

impl Clone for InlinePool {
    fn clone(&self) -> Self {
        InlinePool {
            inner: Arc::clone(&self.inner),
        }
    }
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
    /// A connect has told which protocol the upstream picks (set after the first that succeeds).
    probed: AtomicBool,
    /// Held by the one request whose connect finds that out; the others needing a connection
    /// meanwhile wait for it rather than each shaking hands with an upstream that may multiplex.
    probe: tokio::sync::Mutex<()>,
    /// A task closes idle connections past their time while there are any.
    reaping: AtomicBool,
}

/// What [`InlinePool::send`] did with a request.
pub(super) enum Sent {
    /// The answer's head, and the connection its body is read through.
    Answer(Response<Incoming>, Lease),
    /// The upstream speaks HTTP/2: the request, untouched, is for the multiplexing client.
    Multiplexed(Request<B>),
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
                probed: AtomicBool::new(false),
                probe: tokio::sync::Mutex::new(()),
                reaping: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `req` (an absolute URI on this pool's origin) on an idle connection, or a new one,
    /// and drives it until the answer's head is in. A request the upstream never read (its
    /// reused connection was found closed) is sent again on a new connection; one it may have
    /// read is sent again only if `again` can rebuild it (an idempotent request). `base` names
    /// the upstream in a connect failure's log line.
    pub(super) async fn send<R: Rebuild + Sync>(
        &self,
        mut req: Request<B>,
        again: Option<&R>,
        base: &str,
    ) -> Result<Sent, UpstreamError> {
        if self.inner.multiplexed.load(Ordering::Relaxed) {
            return Ok(Sent::Multiplexed(req));
        }
        let absolute = self.origin_form(&mut req);
        if let Some(conn) = self.checkout() {
            match Lease::new(self, conn).exchange(req).await {
                Ok(sent) => return Ok(sent),
                Err(Failed::Closed(e, unsent)) => {
                    let Some(r) = unsent.map(|r| *r).or_else(|| {
                        again.map(|a| {
                            let mut r = a.build();
                            self.origin_form(&mut r);
                            r
                        })
                    }) else {
                        return Err(e);
                    };
                    tracing::debug!(
                        "reused upstream connection closed before answering; sending again"
                    );
                    req = r;
                }
                Err(Failed::Other(e)) => return Err(e),
            }
        }
        // Boxed: a new connection is the rare case, and its handshake (a TLS session inside)
        // would otherwise size every exchange's future, which is moved whole on each miss.
        let conn = match Box::pin(self.probe_or_connect(base)).await? {
            Some(conn) => conn,
            None => {
                *req.uri_mut() = absolute;
                req.headers_mut().remove(HOST);
                return Ok(Sent::Multiplexed(req));
            }
        };
        match Lease::new(self, conn).exchange(req).await {
            Ok(sent) => Ok(sent),
            Err(Failed::Closed(e, _) | Failed::Other(e)) => Err(e),
        }
    }

    /// Puts `req` in the form HTTP/1.1 carries (the path and query, and a `Host` header);
    /// returns its absolute URI.
    fn origin_form(&self, req: &mut Request<B>) -> Uri {
        let path = req.uri().path_and_query().cloned();
        let origin_form =
            Uri::from(path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        req.headers_mut().insert(HOST, self.inner.host.clone());
        std::mem::replace(req.uri_mut(), origin_form)
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

    /// A new connection, or `None` if the upstream chose HTTP/2. Until one connect has found out
    /// which, only one request dials at a time: those arriving meanwhile wait for its outcome
    /// and dial (in parallel) only if it was HTTP/1.1 or failed.
    async fn probe_or_connect(&self, base: &str) -> Result<Option<Box<Conn>>, UpstreamError> {
        if !self.inner.probed.load(Ordering::Acquire) {
            match self.inner.probe.try_lock() {
                Ok(_probing) => return self.connect(base).await,
                Err(_) => drop(self.inner.probe.lock().await),
            }
            if self.inner.multiplexed.load(Ordering::Acquire) {
                return Ok(None);
            }
        }
        self.connect(base).await
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
            self.inner.multiplexed.store(true, Ordering::Release);
            self.inner.probed.store(true, Ordering::Release);
            return Ok(None);
        }
        self.inner.probed.store(true, Ordering::Release);
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
        let mut evicted = None;
        let start_reaper = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= self.inner.max_idle {
                if idle.is_empty() {
                    return;
                }
                // The least recently used goes (closed outside the lock, when dropped).
                evicted = Some(idle.remove(0));
            }
            idle.push(Idle { conn, since: now });
            !self.inner.reaping.swap(true, Ordering::Relaxed)
        };
        drop(evicted);
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

/// Why an exchange on a connection failed.
enum Failed {
    /// The connection ended (closed or reset) before any answer: a reused one may have been
    /// closed by the upstream while idle. The request comes back if the upstream never read any
    /// of it.
    Closed(UpstreamError, Option<Box<Request<B>>>),
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

    async fn exchange(mut self, req: Request<B>) -> Result<Sent, Failed> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failed::Other(UpstreamError::Protocol));
        };
        let answer = conn.send.try_send_request(req);
        match self.drive(answer).await {
            Ok(Ok(resp)) => Ok(Sent::Answer(resp, self)),
            Ok(Err(mut e)) => {
                let unsent = e.take_message().map(Box::new);
                let e = e.into_error();
                if unsent.is_some()
                    || e.is_canceled()
                    || e.is_incomplete_message()
                    || reset_by_peer(&e)
                {
                    Err(Failed::Closed(protocol(&e), unsent))
                } else {
                    Err(Failed::Other(protocol(&e)))
                }
            }
            Err(Ended) => Err(Failed::Closed(UpstreamError::Protocol, None)),
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
            let ended = self.poll_conn(cx);
            // What the connection just read may have finished the work.
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if ended {
                // Nothing drives the work any more.
                return Poll::Ready(Err(Ended));
            }
            Poll::Pending
        })
        .await
    }

    /// Polls the connection (it reads, decodes and writes what it can, and wakes `cx` when it
    /// can do more). True, and the connection let go, once it has ended.
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return true;
        };
        if Pin::new(&mut conn.driver).poll(cx).is_ready() {
            self.conn = None;
            return true;
        }
        false
    }

    /// The exchange ended cleanly (the whole body read): the connection goes back to the pool.
    pub(super) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

/// The body of an upstream answer. When its connection is one of the pool's, reading the body
/// drives that connection, and the connection goes back to the pool once the body has been
/// read to its end (dropped before that, it is closed).
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl From<Incoming> for UpstreamBody {
    /// A body whose connection something else drives (the multiplexing client's).
    fn from(body: Incoming) -> Self {
        UpstreamBody { body, lease: None }
    }
}

impl UpstreamBody {
    /// `body` read through `lease`. A body that is already at its end (a `204`, a
    /// `Content-Length: 0`, an answer to `HEAD`) may never be polled: its connection goes back
    /// to the pool now.
    pub(super) fn leased(body: Incoming, lease: Lease) -> Self {
        if body.is_end_stream() {
            lease.release();
            return UpstreamBody { body, lease: None };
        }
        UpstreamBody {
            body,
            lease: Some(lease),
        }
    }

    /// Lets the connection go after the body's last frame: back to the pool if it ended
    /// cleanly, closed after an error.
    fn after(
        &mut self,
        frame: Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>,
    ) -> Option<Result<hyper::body::Frame<Bytes>, hyper::Error>> {
        match &frame {
            None => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            Some(Err(_)) => self.lease = None,
            Some(Ok(_)) if self.body.is_end_stream() => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            Some(Ok(_)) => {}
        }
        frame
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(f) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(this.after(f));
        }
        let Some(lease) = this.lease.as_mut() else {
            return Poll::Pending;
        };
        // Dropping an ended connection hands its body hyper's "incomplete" error if the body
        // was cut short; either way the body answers now.
        let ended = lease.poll_conn(cx);
        if ended {
            this.lease = None;
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(this.after(f)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

/// The connection a [`Lease::drive`] polled ended before the work did.
#[derive(Debug)]
pub(super) struct Ended;

/// Did the upstream reset the connection (or close it under a write)? On a reused connection,
/// before any answer, that is an idle connection the upstream had already given up.
fn reset_by_peer(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};

    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = s.source();
    }
    false
}

fn protocol(e: &hyper::Error) -> UpstreamError {
    tracing::debug!(error = %e, "upstream exchange failed");
    UpstreamError::Protocol
}

#[cfg(test)]
#[path = "inline_tests.rs"]
mod tests;
