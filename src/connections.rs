//! The connections one listener holds, and the deadline each one is under.
//!
//! Invariant: no connection keeps a slot without making requests. Before its first complete
//! request head a connection has `header_read_timeout` from admission; once served, it is closed
//! after `idle_timeout` with no request in flight; once closing (idle or shutdown), it has
//! `keep_alive_timeout` with nothing in flight before it is dropped. When every slot is taken, a
//! newcomer gets the slot of the connection that has gone longest without a request in flight
//! (nginx frees its "reusable" connections the same way), once that has lasted
//! [`EVICTION_MIN_QUIET`]; a connection with a request in flight is never taken. Nor does a
//! request keep its connection forever: once a request has been in flight `max_response_time`
//! (a client that stops taking its answer), the connection is closed, unless the request was
//! marked as a stream ([`InFlight::stream`]), which bounds itself.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::ServerConfig;

/// How long a connection must have been without a request in flight before a newcomer may take
/// its slot: enough for a client that has just connected to send its request, short enough that
/// a waiting client (a liveness probe with a one-second timeout) gets in well within its time.
pub const EVICTION_MIN_QUIET: Duration = Duration::from_millis(250);

/// Why a connection ended; the words of the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it, or the protocol ended it (an error, a PING not answered).
    Ended,
    /// No complete request head within `header_read_timeout` of admission.
    FirstRequestTimeout,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// A newcomer needed the slot.
    Evicted,
    /// The server is shutting down.
    Shutdown,
    /// A request was in flight for `max_response_time`: its client stopped taking the answer.
    ResponseTimeout,
    /// The TLS handshake failed or took longer than its own timeout.
    Handshake,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Ended => "ended",
            CloseReason::FirstRequestTimeout => "first_request_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ResponseTimeout => "response_timeout",
            CloseReason::Handshake => "handshake",
        }
    }
}

/// The deadlines of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Admission to the first complete request head.
    pub first_request: Duration,
    /// Served, nothing in flight, not closing.
    pub idle: Duration,
    /// Closing, nothing in flight: time left for the GOAWAY's PING to be answered.
    pub close_grace: Duration,
    /// The longest a request (not a stream) may be in flight before its connection is closed.
    pub max_response: Duration,
}

impl Deadlines {
    pub fn of(cfg: &ServerConfig) -> Deadlines {
        Deadlines {
            first_request: cfg.header_read_timeout,
            idle: cfg.idle_timeout,
            close_grace: cfg.keep_alive_timeout,
            max_response: cfg.max_response_time,
        }
    }
}

/// What the connection's driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing until this instant (or an event).
    Wait(Instant),
    /// Begin a graceful close (GOAWAY on HTTP/2, no more keep-alive on HTTP/1).
    GoAway(CloseReason),
    /// Drop the connection now.
    Close(CloseReason),
}

/// One admitted connection, shared by its driver, its requests and the table.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    /// The table's time origin; `quiet_since` counts from it.
    epoch: Instant,
    admitted: Instant,
    /// Requests whose response has not been completely handed to the transport.
    in_flight: AtomicU32,
    /// Milliseconds after `epoch` at which `in_flight` last became zero (or admission).
    quiet_since: AtomicU64,
    /// Set once the first complete request head has arrived.
    served: AtomicBool,
    /// Set by the table when it wants the slot back.
    evicted: AtomicBool,
    /// Requests in flight under `max_response_time`: (sequence, milliseconds after `epoch`
    /// when each arrived). A handful at most; the oldest bounds the connection.
    started: Mutex<Vec<(u64, u64)>>,
    /// Sequence numbers of requests, for `started`.
    next_request: AtomicU64,
    evict: Notify,
}

/// Held while a request is in flight on its connection; dropping it marks the end.
#[derive(Debug)]
pub struct InFlight {
    conn: Arc<Conn>,
    /// The request's entry in `Conn::started`, until it is marked a stream.
    seq: Option<u64>,
}

impl InFlight {
    /// Marks the request as a stream: it may stay in flight past `max_response_time`, because
    /// its own bounds (heartbeats, upstream idle and run timeouts) end it.
    pub fn stream(&mut self) {
        if let Some(seq) = self.seq.take() {
            self.conn.forget(seq);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.conn;
        if let Some(seq) = self.seq {
            c.forget(seq);
        }
        c.quiet_since
            .store(c.millis(Instant::now()), Ordering::Release);
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until hyper has sent it and dropped it;
/// size and end-of-stream pass through, so `Content-Length` is unchanged.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Conn {
    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Marks a request as arrived; the connection counts as busy until the guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        let seq = self.next_request.fetch_add(1, Ordering::Relaxed);
        let now = self.millis(Instant::now());
        self.started_lock().push((seq, now));
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // After the increment: whoever sees `served` also sees the request in flight.
        self.served.store(true, Ordering::Release);
        InFlight {
            conn: Arc::clone(self),
            seq: Some(seq),
        }
    }

    fn started_lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        // Every use is one push, one removal or one scan: a panic cannot leave it half-updated.
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops request `seq` from `started`.
    fn forget(&self, seq: u64) {
        let mut started = self.started_lock();
        if let Some(i) = started.iter().position(|(s, _)| *s == seq) {
            started.swap_remove(i);
        }
    }

    /// When the oldest request in flight under `max_response_time` arrived, if there is one.
    fn oldest_request(&self) -> Option<Instant> {
        let ms = self.started_lock().iter().map(|(_, at)| *at).min()?;
        Some(self.epoch + Duration::from_millis(ms))
    }

    /// When the connection last had nothing in flight, if it has nothing in flight now.
    fn quiet(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.quiet_since.load(Ordering::Acquire);
        Some(self.epoch + Duration::from_millis(ms))
    }

    /// Whether nothing is in flight.
    pub fn is_quiet(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Resolves when the table asks for the slot back.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// Withdraws an eviction that came as a request arrived; the table will look again.
    pub fn keep(&self) {
        self.evicted.store(false, Ordering::Release);
    }

    /// The instant by which the first request head must have arrived.
    pub fn first_request_deadline(&self, d: &Deadlines) -> Instant {
        self.admitted + d.first_request
    }

    /// What to do at `now`, given when and why a graceful close began (if it did). A wait is
    /// never longer than `max_response`: a request that arrives meanwhile, which wakes nobody,
    /// is looked at by the end of its time.
    pub fn next(
        &self,
        now: Instant,
        d: &Deadlines,
        closing: Option<(Instant, CloseReason)>,
    ) -> Step {
        match self.step(now, d, closing) {
            Step::Wait(at) => Step::Wait(at.min(now + d.max_response)),
            step => step,
        }
    }

    fn step(&self, now: Instant, d: &Deadlines, closing: Option<(Instant, CloseReason)>) -> Step {
        if !self.served.load(Ordering::Acquire) {
            // Nothing was asked yet, so nothing is lost by closing at once.
            if let Some((_, why)) = closing {
                return Step::Close(why);
            }
            let at = self.first_request_deadline(d);
            return if now >= at {
                Step::Close(CloseReason::FirstRequestTimeout)
            } else {
                // A first request may arrive before `at` and be over before it: look again
                // by the earliest instant its idle deadline could fall at.
                Step::Wait(at.min(now + d.idle))
            };
        }
        let Some(quiet) = self.quiet() else {
            // Busy: look again later; a request's end moves the deadline past this anyway.
            let recheck = if closing.is_some() {
                d.close_grace
            } else {
                d.idle
            };
            let Some(oldest) = self.oldest_request() else {
                return Step::Wait(now + recheck);
            };
            let at = oldest + d.max_response;
            return if now >= at {
                Step::Close(CloseReason::ResponseTimeout)
            } else {
                Step::Wait(at.min(now + recheck))
            };
        };
        match closing {
            Some((began, why)) => {
                let at = quiet.max(began) + d.close_grace;
                if now >= at {
                    Step::Close(why)
                } else {
                    Step::Wait(at)
                }
            }
            None => {
                let at = quiet + d.idle;
                if now >= at {
                    Step::GoAway(CloseReason::Idle)
                } else {
                    Step::Wait(at)
                }
            }
        }
    }
}

/// The slots of one listener and the connections holding them.
#[derive(Debug)]
pub struct Table {
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// A connection's hold on its slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<Table>,
    conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
}

impl Admitted {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.lock().remove(&self.conn.id);
    }
}

/// What looking for a slot to take found.
#[derive(Debug, PartialEq, Eq)]
enum Eviction {
    /// A connection was asked to give its slot back.
    Asked,
    /// None can be taken yet; look again after this long.
    NotYet(Duration),
}

impl Table {
    pub fn new(max_connections: usize) -> Arc<Table> {
        Arc::new(Table {
            slots: Arc::new(Semaphore::new(max_connections)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A panic elsewhere cannot leave the map half-updated: every use is one call.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for a connection just accepted, taking one from the connection that has
    /// gone longest without a request when all are held.
    pub async fn admit(self: &Arc<Self>) -> Admitted {
        loop {
            if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
                return self.register(slot);
            }
            // An asked connection closes within moments; if it does not, ask the next one.
            let wait = match self.evict_one(Instant::now()) {
                Eviction::Asked => EVICTION_MIN_QUIET,
                Eviction::NotYet(d) => d,
            };
            let freed = tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned()).await;
            if let Ok(Ok(slot)) = freed {
                return self.register(slot);
            }
        }
    }

    fn register(self: &Arc<Self>, slot: OwnedSemaphorePermit) -> Admitted {
        let now = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            epoch: self.epoch,
            admitted: now,
            in_flight: AtomicU32::new(0),
            quiet_since: AtomicU64::new(
                now.saturating_duration_since(self.epoch).as_millis() as u64
            ),
            served: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            started: Mutex::new(Vec::new()),
            next_request: AtomicU64::new(0),
        });
        self.lock().insert(id, Arc::clone(&conn));
        Admitted {
            table: Arc::clone(self),
            conn,
            _slot: slot,
        }
    }

    /// Asks the connection quiet the longest (at least [`EVICTION_MIN_QUIET`]) to close.
    fn evict_one(&self, now: Instant) -> Eviction {
        let live = self.lock();
        let oldest = live
            .values()
            .filter(|c| !c.evicted.load(Ordering::Acquire))
            .filter_map(|c| c.quiet().map(|q| (q, c)))
            .min_by_key(|(q, c)| (*q, c.id));
        match oldest {
            Some((quiet, c)) if now >= quiet + EVICTION_MIN_QUIET => {
                c.evicted.store(true, Ordering::Release);
                c.evict.notify_one();
                Eviction::Asked
            }
            Some((quiet, _)) => Eviction::NotYet(quiet + EVICTION_MIN_QUIET - now),
            // Every connection is busy: a slot frees when one finishes.
            None => Eviction::NotYet(EVICTION_MIN_QUIET),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadlines() -> Deadlines {
        Deadlines {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            close_grace: Duration::from_secs(5),
            max_response: Duration::from_secs(120),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_past_max_response_closes_its_connection_unless_a_stream() {
        let t = Table::new(2);
        let a = t.admit().await;
        let c = a.conn();
        let d = deadlines();
        let first = c.request();
        tokio::time::advance(Duration::from_secs(100)).await;
        // A second request arrives later; the first one's age bounds the connection.
        let _second = c.request();
        let t1 = Instant::now();
        assert_eq!(
            c.next(t1, &d, None),
            Step::Wait(t1 + Duration::from_secs(20))
        );
        assert_eq!(
            c.next(t1 + Duration::from_secs(20), &d, None),
            Step::Close(CloseReason::ResponseTimeout)
        );
        // Once the first ends, the second's age counts.
        drop(first);
        assert_eq!(c.next(t1, &d, None), Step::Wait(t1 + d.idle));
        assert_eq!(
            c.next(t1 + d.max_response, &d, None),
            Step::Close(CloseReason::ResponseTimeout)
        );
        // A stream is bounded by its own timeouts, not this one.
        let b = t.admit().await;
        let mut stream = b.conn().request();
        stream.stream();
        let t2 = Instant::now();
        assert_eq!(
            b.conn().next(t2 + d.max_response * 10, &d, None),
            Step::Wait(t2 + d.max_response * 10 + d.idle)
        );
        drop(stream);
        assert!(b.conn().is_quiet());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_moves_from_first_request_to_idle_to_closing() {
        let t = Table::new(4);
        let a = t.admit().await;
        let c = a.conn();
        let d = deadlines();
        let t0 = Instant::now();
        assert_eq!(c.next(t0, &d, None), Step::Wait(t0 + d.first_request));
        let short_idle = Deadlines {
            idle: Duration::from_secs(1),
            ..d
        };
        assert_eq!(
            c.next(t0, &short_idle, None),
            Step::Wait(t0 + short_idle.idle)
        );
        assert_eq!(
            c.next(t0 + d.first_request, &d, None),
            Step::Close(CloseReason::FirstRequestTimeout)
        );
        // A request arrives: busy, no deadline applies.
        tokio::time::advance(Duration::from_secs(1)).await;
        let r = c.request();
        let busy = c.next(Instant::now() + d.first_request, &d, None);
        assert!(matches!(busy, Step::Wait(_)), "{busy:?}");
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(r);
        let quiet = Instant::now();
        assert_eq!(c.next(quiet, &d, None), Step::Wait(quiet + d.idle));
        assert_eq!(
            c.next(quiet + d.idle, &d, None),
            Step::GoAway(CloseReason::Idle)
        );
        // Closing: nothing in flight, the grace counts from the GOAWAY.
        let closing = Some((quiet + d.idle, CloseReason::Idle));
        assert_eq!(
            c.next(quiet + d.idle, &d, closing),
            Step::Wait(quiet + d.idle + d.close_grace)
        );
        assert_eq!(
            c.next(quiet + d.idle + d.close_grace, &d, closing),
            Step::Close(CloseReason::Idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_a_connection_that_never_asked_at_once() {
        let t = Table::new(1);
        let a = t.admit().await;
        let now = Instant::now();
        assert_eq!(
            a.conn()
                .next(now, &deadlines(), Some((now, CloseReason::Shutdown))),
            Step::Close(CloseReason::Shutdown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_takes_the_longest_quiet_slot_and_never_a_busy_one() {
        let t = Table::new(3);
        let busy = t.admit().await;
        let _r = busy.conn().request();
        tokio::time::advance(Duration::from_secs(1)).await;
        let older = t.admit().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let younger = t.admit().await;
        assert_eq!(t.evict_one(Instant::now()), Eviction::Asked);
        assert!(older.conn().evicted.load(Ordering::Acquire));
        assert!(!younger.conn().evicted.load(Ordering::Acquire));
        assert!(!busy.conn().evicted.load(Ordering::Acquire));
        // The younger one is next, once it has been quiet long enough.
        assert_eq!(
            t.evict_one(Instant::now()),
            Eviction::NotYet(EVICTION_MIN_QUIET)
        );
        tokio::time::advance(EVICTION_MIN_QUIET).await;
        assert_eq!(t.evict_one(Instant::now()), Eviction::Asked);
        assert!(younger.conn().evicted.load(Ordering::Acquire));
        // Only the busy one is left: nothing to take.
        assert_eq!(
            t.evict_one(Instant::now()),
            Eviction::NotYet(EVICTION_MIN_QUIET)
        );
        assert!(!busy.conn().evicted.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn admit_waits_while_every_connection_is_busy() {
        let t = Table::new(1);
        let a = t.admit().await;
        let r = a.conn().request();
        let waiting = tokio::spawn({
            let t = Arc::clone(&t);
            async move { t.admit().await.conn().id }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        assert!(!a.conn().evicted.load(Ordering::Acquire));
        drop(r);
        drop(a);
        assert_eq!(waiting.await.unwrap(), 1);
    }
}
