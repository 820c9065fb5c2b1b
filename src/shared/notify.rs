//! Fetch-completion notifications: one pub/sub connection per tier, fanned out to local waiters.
//!
//! Invariant: a waiter registered before it re-checks Redis cannot miss a completion published
//! after that re-check — either the message reaches it, or the subscription was down (the waiter
//! sees `connected() == false` or is woken with [`Signal::Lost`]) and it fetches for itself. No
//! waiter ever polls Redis; the subscriber task is the only reader of the channel and reconnects
//! by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Client;
use tokio::sync::broadcast;

use super::errors::{Health, SharedError};
use super::keys::parse_done_payload;

/// How often the subscriber pings its connection, so a dead one is noticed without traffic.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Longest pause between two subscription attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First pause after a failed subscription attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// What a waiter is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The fetch for this run finished; `stored` says whether it left a value in Redis.
    Done { stored: bool },
    /// The subscription broke or came (back) up: a completion may have been missed.
    Lost,
}

/// Local waiters by run name (`app_tag:run_id`), and whether the subscription is live.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// One channel per run somebody here waits for; removed when its last waiter leaves.
    waiters: Mutex<HashMap<String, broadcast::Sender<Signal>>>,
    /// True while the subscription is confirmed; set false before waiters are woken with `Lost`.
    connected: AtomicBool,
}

impl Registry {
    fn table(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Signal>>> {
        // Only single inserts, removes and sends happen under this lock; a panic cannot leave
        // the map inconsistent, so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Is the subscription live right now?
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Registers a waiter for `run`. Messages published from now on reach it.
    pub(crate) fn register(self: &Arc<Self>, run: &str) -> Waiter {
        let rx = self
            .table()
            .entry(run.to_owned())
            .or_insert_with(|| broadcast::channel(1).0)
            .subscribe();
        Waiter {
            registry: Arc::clone(self),
            run: run.to_owned(),
            rx: Some(rx),
        }
    }

    /// Wakes the waiters of `run`, if any.
    fn dispatch(&self, run: &str, signal: Signal) {
        if let Some(tx) = self.table().get(run) {
            let _ = tx.send(signal);
        }
    }

    /// Marks the subscription live, then wakes every waiter registered while it was down: a
    /// completion published before it came up never reached them.
    fn set_connected(&self) {
        if !self.connected.swap(true, Ordering::SeqCst) {
            for tx in self.table().values() {
                let _ = tx.send(Signal::Lost);
            }
        }
    }

    /// Marks the subscription down, then wakes every waiter: what they wait for may be lost.
    fn set_lost(&self) {
        self.connected.store(false, Ordering::SeqCst);
        for tx in self.table().values() {
            let _ = tx.send(Signal::Lost);
        }
    }

    /// Runs whose waiters are registered (for tests).
    pub(crate) fn len(&self) -> usize {
        self.table().len()
    }
}

/// A registered waiter; leaving (drop) unregisters it.
pub(crate) struct Waiter {
    registry: Arc<Registry>,
    run: String,
    rx: Option<broadcast::Receiver<Signal>>,
}

impl Waiter {
    /// The next signal for this run; `None` if the registry dropped the channel (cannot happen
    /// while this waiter is registered, but is handled as a loss).
    pub(crate) async fn recv(&mut self) -> Option<Signal> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(s) => Some(s),
            // Capacity 1: a lagged receiver missed an older signal, the newest is still a signal.
            Err(broadcast::error::RecvError::Lagged(_)) => rx.recv().await.ok(),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut table = self.registry.table();
        // Drop the receiver under the lock, so the count below is exact.
        drop(self.rx.take());
        if table
            .get(&self.run)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            table.remove(&self.run);
        }
    }
}

/// The subscriber: keeps one subscription to `channel` alive on one of `clients` (tried in turn),
/// wakes local waiters for each message, and marks the registry lost whenever it breaks. Ends
/// when the tier is dropped (the task is aborted).
pub(crate) async fn subscribe_forever(
    registry: Arc<Registry>,
    health: Arc<Health>,
    clients: Vec<Client>,
    channel: String,
    connect_timeout: Duration,
) {
    let mut backoff = MIN_BACKOFF;
    for client in clients.iter().cycle() {
        let subscribed = tokio::time::timeout(connect_timeout, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        let ps = match subscribed {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                health.fail("subscribe", SharedError::from_redis(&e), &e.category());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_) => {
                health.fail("subscribe", SharedError::Timeout, &"connect timed out");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        registry.set_connected();
        tracing::debug!(target: "shared", "notification subscription up");
        let (mut sink, mut stream) = ps.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let why = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(m) => {
                        if let Some((run, stored)) = parse_done_payload(m.get_payload_bytes()) {
                            registry.dispatch(run, Signal::Done { stored });
                        }
                    }
                    None => break SharedError::Connection,
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(connect_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break SharedError::from_redis(&e),
                        Err(_) => break SharedError::Timeout,
                    }
                }
            }
        };
        registry.set_lost();
        health.fail(
            "subscription",
            why,
            &"notification subscription lost; reconnecting",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_signals_for_their_run_only_and_unregister() {
        let r = Arc::new(Registry::default());
        let mut a1 = r.register("t:a");
        let mut a2 = r.register("t:a");
        let mut b = r.register("t:b");
        assert_eq!(r.len(), 2);
        r.dispatch("t:a", Signal::Done { stored: true });
        r.dispatch("t:zzz", Signal::Done { stored: false });
        assert_eq!(a1.recv().await, Some(Signal::Done { stored: true }));
        assert_eq!(a2.recv().await, Some(Signal::Done { stored: true }));
        r.set_lost();
        assert_eq!(b.recv().await, Some(Signal::Lost));
        drop(a1);
        assert_eq!(r.len(), 2);
        drop(a2);
        drop(b);
        assert_eq!(r.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_registered_while_down_is_woken_when_the_subscription_comes_up() {
        let r = Arc::new(Registry::default());
        let mut early = r.register("t:a");
        r.set_connected();
        // Whatever was published before the subscription was up is told as a possible loss.
        assert_eq!(early.recv().await, Some(Signal::Lost));
        // From now on, completions reach it; a second confirmation wakes nobody.
        r.set_connected();
        r.dispatch("t:a", Signal::Done { stored: true });
        assert_eq!(early.recv().await, Some(Signal::Done { stored: true }));
        let mut late = r.register("t:a");
        r.set_connected();
        let none = tokio::time::timeout(Duration::from_millis(50), late.recv()).await;
        assert!(
            none.is_err(),
            "woken by a subscription that never went down"
        );
    }

    #[tokio::test]
    async fn a_signal_sent_after_registration_is_not_lost() {
        let r = Arc::new(Registry::default());
        let mut w = r.register("t:a");
        // Sent before the waiter starts awaiting: still delivered.
        r.dispatch("t:a", Signal::Done { stored: false });
        let got = tokio::time::timeout(Duration::from_secs(1), w.recv()).await;
        assert_eq!(got.ok().flatten(), Some(Signal::Done { stored: false }));
    }
}
