//! Single flight: concurrent misses for one key share one upstream fetch.
//!
//! Contract: the first request for a key that is neither cached nor in flight becomes the
//! leader and runs the fetch on its own task; a leader dropped before the fetch ends (its client
//! disconnected) hands the rest of it to a **task of its own**, so it does not cancel it for the
//! others. Every request that arrives while it runs waits for that same
//! result, woken when it completes (no polling); the key is freed just before the result is
//! published, so a fetch nobody joined wakes no one. If the fetch fails, every waiter gets the same
//! failure and nothing is cached (the fetch itself decides what is cached, before it publishes).
//! If the fetch panics, waiters get [`FlightLost`] and the key is freed.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;

use tokio::sync::watch;

/// How a request took part in a flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It started the fetch.
    Leader,
    /// It joined a fetch already under way.
    Follower,
    /// The re-check under the lock found a value (a flight finished just before).
    Rechecked,
}

/// The fetch ended without publishing a result (it panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared fetch ended without a result")]
pub struct FlightLost;

type Slot<V> = watch::Receiver<Option<V>>;

/// The table of fetches in flight.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Slot<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

/// Removes the key from the table when the fetch ends, however it ends.
struct Landing<K: Hash + Eq, V> {
    flights: Arc<SingleFlight<K, V>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.flights.table().remove(&k);
        }
    }
}

impl<K, V> SingleFlight<K, V> {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<K, Slot<V>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Number of fetches in flight.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// True when nothing is in flight.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins or starts the fetch for `key`. `recheck` runs under the table lock before a new
    /// fetch starts (it looks in the cache again, closing the race with a flight that has just
    /// landed); `fetch` builds the future that the new task runs.
    pub async fn run<R, F, Fut>(
        self: &Arc<Self>,
        key: K,
        recheck: R,
        fetch: F,
    ) -> Result<(V, Role), FlightLost>
    where
        R: FnOnce() -> Option<V>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let joined = {
            let mut table = self.table();
            match table.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    if let Some(v) = recheck() {
                        return Ok((v, Role::Rechecked));
                    }
                    let (tx, rx) = watch::channel(None);
                    table.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        let tx = match joined {
            Ok(tx) => tx,
            Err(mut rx) => {
                let value = rx
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| FlightLost)?
                    .clone();
                return value.map(|v| (v, Role::Follower)).ok_or(FlightLost);
            }
        };
        // The landing first: should building the fetch panic, the key is still freed.
        let landing = Landing {
            flights: Arc::clone(self),
            key: Some(key),
        };
        let mut flying = Flying {
            fetch: Some(Box::pin(fetch())),
            tx: Some(tx),
            landing: Some(landing),
        };
        // The leader runs the fetch on its own task; should it be dropped first (its client
        // left), `Flying` hands the rest of the fetch to a task of its own.
        let fetch = flying.fetch.as_mut().expect("set above");
        let outcome = AssertUnwindSafe(fetch).catch_unwind().await;
        flying.fetch = None;
        let (tx, landing) = (flying.tx.take(), flying.landing.take());
        let Ok(v) = outcome else {
            // A panicking fetch: the waiters lose it (the sender goes), the key is freed.
            return Err(FlightLost);
        };
        // Free the key, then publish: a request arriving in between re-checks the cache (where
        // the fetch has already put what it keeps) or starts a fetch of its own. With the
        // table's receiver gone, a flight nobody joined publishes to no one and makes no
        // wake-up calls (`send` returns at once without receivers).
        drop(landing);
        if let Some(tx) = tx {
            let _ = tx.send(Some(v.clone()));
        }
        Ok((v, Role::Leader))
    }
}

/// A fetch the leader is running. Dropped unfinished (the leader's request went away, or its
/// task panicked elsewhere: a panic of the fetch itself is caught and leaves nothing to run), it
/// goes on on a task of its own, so the waiters still get its value.
struct Flying<K: Hash + Eq + Send + 'static, V: Send + Sync + 'static> {
    fetch: Option<Pin<Box<dyn Future<Output = V> + Send>>>,
    tx: Option<watch::Sender<Option<V>>>,
    landing: Option<Landing<K, V>>,
}

impl<K: Hash + Eq + Send + 'static, V: Send + Sync + 'static> Drop for Flying<K, V> {
    fn drop(&mut self) {
        let (Some(fetch), Some(tx), Some(landing)) =
            (self.fetch.take(), self.tx.take(), self.landing.take())
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let outcome = AssertUnwindSafe(fetch).catch_unwind().await;
            drop(landing);
            if let Ok(v) = outcome {
                let _ = tx.send(Some(v));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_fetch() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (f, calls) = (f.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                f.run(
                    7,
                    || None,
                    || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            42
                        }
                    },
                )
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, role) = t.await.unwrap().unwrap();
            assert_eq!(v, 42);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert!(f.is_empty());
    }

    /// A leader whose fetch of `key` waits for the returned sender, then yields `value` (also
    /// sent on the returned receiver); the leader is aborted once its flight is up.
    async fn aborted_leader(
        f: &Arc<SingleFlight<u32, u64>>,
        key: u32,
        value: u64,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(u64, Role), FlightLost>>,
        tokio::sync::oneshot::Receiver<u64>,
    ) {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u64>();
        let leader = {
            let f = f.clone();
            tokio::spawn(async move {
                let fetch = || async move {
                    let _ = go_rx.await;
                    let _ = done_tx.send(value);
                    value
                };
                f.run(key, || None, fetch).await
            })
        };
        while f.is_empty() {
            tokio::task::yield_now().await;
        }
        leader.abort();
        (go_tx, leader, done_rx)
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_cancel_the_fetch() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let (go_tx, _leader, _done) = aborted_leader(&f, 1, 5).await;
        let follower = {
            let f = f.clone();
            tokio::spawn(async move { f.run(1, || None, || async { 99 }).await })
        };
        tokio::task::yield_now().await;
        go_tx.send(()).unwrap();
        let (v, role) = follower.await.unwrap().unwrap();
        assert_eq!((v, role), (5, Role::Follower));
    }

    #[tokio::test]
    async fn a_fetch_whose_leader_left_with_nobody_waiting_still_lands() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let (go_tx, leader, done_rx) = aborted_leader(&f, 7, 8).await;
        assert!(leader.await.unwrap_err().is_cancelled());
        // The fetch goes on without its leader, then frees the key.
        assert_eq!(f.len(), 1);
        go_tx.send(()).unwrap();
        assert_eq!(done_rx.await, Ok(8));
        while !f.is_empty() {
            tokio::task::yield_now().await;
        }
        let r = f.run(7, || None, || async { 9 }).await;
        assert_eq!(r, Ok((9, Role::Leader)));
    }

    #[tokio::test]
    async fn a_fetch_that_panics_while_being_built_frees_the_key() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let g = Arc::clone(&f);
        let built = tokio::spawn(async move {
            g.run(
                5,
                || None,
                || -> std::future::Ready<u64> { panic!("cannot build the fetch") },
            )
            .await
        });
        assert!(built.await.unwrap_err().is_panic());
        assert!(f.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_fetch_frees_the_key_and_fails_waiters() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let r = f
            .run(
                3,
                || None,
                || async {
                    if true {
                        panic!("fetch blew up");
                    }
                    1
                },
            )
            .await;
        assert_eq!(r, Err(FlightLost));
        assert!(f.is_empty());
        let r = f.run(3, || None, || async { 2 }).await;
        assert_eq!(r, Ok((2, Role::Leader)));
    }
}
