//! Single flight: concurrent misses for one key share one upstream fetch.
//!
//! Contract: the first request for a key that is neither cached nor in flight becomes the
//! leader and starts the fetch on its **own task**, so a leader whose client disconnects does
//! not cancel it for the others. Every request that arrives while it runs waits for that same
//! result, woken when it completes (no polling). If the fetch fails, every waiter gets the same
//! failure and nothing is cached (the fetch itself decides what is cached, before it publishes).
//! If the fetch task dies without a result, waiters get [`FlightLost`] and the key is freed.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

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

/// The fetch task ended without publishing a result.
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

/// Removes the key from the table when the fetch task ends, however it ends.
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
        let (mut rx, role) = {
            let mut table = self.table();
            if let Some(rx) = table.get(&key) {
                (rx.clone(), Role::Follower)
            } else {
                if let Some(v) = recheck() {
                    return Ok((v, Role::Rechecked));
                }
                let (tx, rx) = watch::channel(None);
                table.insert(key.clone(), rx.clone());
                let landing = Landing {
                    flights: Arc::clone(self),
                    key: Some(key),
                };
                let fut = fetch();
                tokio::spawn(async move {
                    let v = fut.await;
                    // Publish first, then free the key: a request arriving in between joins
                    // this finished flight and gets its value at once.
                    let _ = tx.send(Some(v));
                    drop(landing);
                });
                (rx, Role::Leader)
            }
        };
        let value = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| FlightLost)?
            .clone();
        value.map(|v| (v, role)).ok_or(FlightLost)
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

    #[tokio::test]
    async fn a_cancelled_leader_does_not_cancel_the_fetch() {
        let f: Arc<SingleFlight<u32, u64>> = Arc::default();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let f = f.clone();
            tokio::spawn(async move {
                f.run(
                    1,
                    || None,
                    || async move {
                        let _ = go_rx.await;
                        5
                    },
                )
                .await
            })
        };
        tokio::task::yield_now().await;
        while f.is_empty() {
            tokio::task::yield_now().await;
        }
        leader.abort();
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
