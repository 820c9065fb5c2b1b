//! Watches of running runs for the clients that wait on them (`Prefer: wait=N` and the status
//! stream): one watcher per run, however many wait.
//!
//! Invariant: while at least one waiter holds a run, exactly one watcher task refreshes it, at
//! most once per its entry's TTL (`cache.running_ttl`), through the same coalesced fetch the
//! pollers use; with the shared tier, a fetch completed on any replica is read at once. Every
//! waiter sees each change of the body (a new ETag) and is woken when the watcher ends (the run
//! is no longer running, nobody waits, or the gateway shuts down). Waiters are counted against
//! `longpoll.max_waiters` and their client's `max_waiters`, and released (permits, gauges) when
//! dropped. No waiter polls and none arms a timer: each sleeps on its channel and on its slot of
//! the shared [`Deadlines`] (one timer for every held request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cache::fetch::Fetch;
use crate::cache::{CacheKey, Stored};
use crate::clients::Client;
use crate::deadlines::{Deadline, Deadlines};
use crate::metrics::Metrics;
use crate::policy::EntryClass;
use crate::upstream::App;

/// The request id the watcher's own fetches carry in logs and upstream headers.
static WATCH_REQUEST_ID: HeaderValue = HeaderValue::from_static("longpoll-watcher");

/// Why a request may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `longpoll.max_waiters` requests are held already.
    Gateway,
    /// The client holds its `max_waiters` already.
    Client,
}

/// Is `s` an answer a waiter may wait on: a running run's, kept?
pub fn is_running(s: &Stored) -> bool {
    s.class == Some(EntryClass::Running)
}

/// The watchers, one per running run somebody waits for.
pub struct Watchers {
    fetch: Arc<Fetch>,
    /// Refresh period when an entry carries no TTL of its own: `cache.running_ttl`.
    running_ttl: Duration,
    /// `longpoll.max_waiters`.
    slots: Arc<Semaphore>,
    runs: Mutex<HashMap<CacheKey, watch::Sender<Arc<Stored>>>>,
    /// Set once, on shutdown: every watcher ends and its waiters answer.
    stop: watch::Sender<bool>,
    /// The waiters' deadlines, on one timer.
    deadlines: Arc<Deadlines>,
    metrics: Arc<Metrics>,
}

/// One held request: the run's current state as its watcher sees it.
pub struct Waiter {
    rx: watch::Receiver<Arc<Stored>>,
    deadlines: Arc<Deadlines>,
    _slots: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    metrics: Arc<Metrics>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.metrics.longpoll_waiters.dec();
    }
}

impl Waiter {
    /// The run's state now.
    pub fn current(&self) -> Arc<Stored> {
        Arc::clone(&self.rx.borrow())
    }

    /// Waits until `done` holds for the current state, or until `deadline`, or until the
    /// watcher ends; returns the state then.
    pub async fn until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Stored) -> bool,
    ) -> Arc<Stored> {
        let mut deadline = self.deadline(deadline);
        tokio::select! {
            _ = self.rx.wait_for(|s| done(s)) => {}
            _ = deadline.reached() => {}
        }
        self.current()
    }

    /// A deadline on the shared timer (fired at most [`crate::deadlines::TICK`] early).
    pub fn deadline(&self, at: Instant) -> Deadline {
        self.deadlines.at(at)
    }

    /// The next state whose body differs from the last one seen; `None` once the watcher has
    /// ended with nothing new (the run stopped running, or shutdown).
    pub async fn changed(&mut self) -> Option<Arc<Stored>> {
        match self.rx.changed().await {
            Ok(()) => Some(Arc::clone(&self.rx.borrow_and_update())),
            Err(_) => None,
        }
    }

    /// Marks the current state as seen.
    pub fn seen(&mut self) -> Arc<Stored> {
        Arc::clone(&self.rx.borrow_and_update())
    }
}

impl Watchers {
    pub fn new(
        fetch: Arc<Fetch>,
        running_ttl: Duration,
        max_waiters: usize,
        metrics: Arc<Metrics>,
    ) -> Watchers {
        Watchers {
            fetch,
            running_ttl,
            slots: Arc::new(Semaphore::new(max_waiters)),
            runs: Mutex::default(),
            stop: watch::channel(false).0,
            deadlines: Arc::default(),
            metrics,
        }
    }

    /// Ends every watch: waiters answer with the state they have, and no new one waits.
    pub fn shut_down(&self) {
        self.stop.send_replace(true);
    }

    /// Has shutdown begun?
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Registers a waiter on `key`, whose state is `current` (a running answer), watching the
    /// run if nobody does yet.
    pub fn join(
        self: &Arc<Self>,
        app: &Arc<App>,
        key: CacheKey,
        current: Arc<Stored>,
        client: Option<&Arc<Client>>,
    ) -> Result<Waiter, Full> {
        let mine = match client.and_then(|c| c.waiters.as_ref()) {
            Some(s) => Some(
                Arc::clone(s)
                    .try_acquire_owned()
                    .map_err(|_| Full::Client)?,
            ),
            None => None,
        };
        let global = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Full::Gateway)?;
        let rx = {
            let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
            match runs.get(&key) {
                Some(tx) => {
                    // The caller may have just fetched a newer state than the watcher holds.
                    tx.send_if_modified(|s| newer(s, &current));
                    tx.subscribe()
                }
                None => {
                    let (tx, rx) = watch::channel(current);
                    runs.insert(key, tx.clone());
                    self.metrics.longpoll_watchers.inc();
                    let leader = client.cloned();
                    tokio::spawn(Arc::clone(self).watch(Arc::clone(app), key, tx, leader));
                    rx
                }
            }
        };
        self.metrics.longpoll_waiters.inc();
        Ok(Waiter {
            rx,
            deadlines: Arc::clone(&self.deadlines),
            _slots: (global, mine),
            metrics: Arc::clone(&self.metrics),
        })
    }

    /// The watcher of one run: refreshes it once per TTL (or reads what another replica
    /// fetched) while anyone waits and it runs. Its fetches are charged to `leader`, the client
    /// whose waiter started the watch (its upstream share; a run it ends is counted to it as its
    /// first reader when no starter is on record).
    async fn watch(
        self: Arc<Self>,
        app: Arc<App>,
        key: CacheKey,
        tx: watch::Sender<Arc<Stored>>,
        leader: Option<Arc<Client>>,
    ) {
        let mut stop = self.stop.subscribe();
        let mut fleet = self
            .fetch
            .shared()
            .and_then(|s| s.completions(&app.credentials().tag, key.run));
        let mut last_try: Option<Instant> = None;
        loop {
            let cur = Arc::clone(&tx.borrow());
            if !is_running(&cur) || *stop.borrow() {
                break;
            }
            let ttl = cur
                .ttl
                .unwrap_or(self.running_ttl)
                .max(Duration::from_millis(1));
            let fresh_until = Instant::from_std(cur.fetched_at) + ttl;
            let next = last_try.map_or(fresh_until, |t| fresh_until.max(t + ttl));
            let from_fleet = tokio::select! {
                _ = tokio::time::sleep_until(next) => false,
                _ = tx.closed() => {
                    if self.retire(&key, &tx) {
                        return;
                    }
                    continue;
                }
                _ = stop.changed() => break,
                signal = completion(&mut fleet) => {
                    if signal.is_none() {
                        // The subscription broke: the timer alone refreshes from now on.
                        fleet = None;
                    }
                    true
                }
            };
            let got = if from_fleet {
                self.fetch.read_shared(&app, key.run).await
            } else {
                last_try = Some(Instant::now());
                let leader = leader.as_ref();
                self.fetch
                    .run(&app, key.run, &WATCH_REQUEST_ID, leader)
                    .await
                    .ok()
                    .and_then(|(v, _)| v.stored())
            };
            // A failed refresh keeps the last state: waiters see a change or their deadline.
            if let Some(s) = got.filter(|s| s.class.is_some()) {
                tx.send_if_modified(|old| newer(old, &s));
            }
        }
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if runs.get(&key).is_some_and(|t| t.same_channel(&tx)) {
            runs.remove(&key);
            self.metrics.longpoll_watchers.dec();
        }
        // Dropping `tx` wakes every waiter with the state it holds.
    }

    /// Ends the watch of `key` if nobody waits any more (checked under the map's lock, so a
    /// waiter joining now finds either this watcher or none).
    fn retire(&self, key: &CacheKey, tx: &watch::Sender<Arc<Stored>>) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if tx.receiver_count() > 0 {
            return false;
        }
        if runs.get(key).is_some_and(|t| t.same_channel(tx)) {
            runs.remove(key);
            self.metrics.longpoll_watchers.dec();
        }
        true
    }
}

/// The next fleet-wide completion; pending forever without a subscription.
async fn completion(fleet: &mut Option<crate::shared::Completions>) -> Option<()> {
    match fleet {
        Some(w) => w.recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Replaces `old` with `new` when `new` is at least as recent; true (waiters wake) when the
/// body changed.
fn newer(old: &mut Arc<Stored>, new: &Arc<Stored>) -> bool {
    if new.fetched_at < old.fetched_at {
        return false;
    }
    let changed = new.etag != old.etag || new.status != old.status;
    *old = Arc::clone(new);
    changed
}
