//! Deadlines for held requests (long-polls, status-stream heartbeats) on one shared timer.
//!
//! Invariant: however many requests wait, at most one timer is armed — the ticker's, for the
//! earliest pending slot. A deadline is rounded down to its slot (a multiple of [`TICK`] from the
//! start), so it fires no later than asked and at most one [`TICK`] earlier; every deadline of a
//! slot fires with one wake-up of the ticker, and a deadline already past fires at once. Slots
//! are kept until they fire (a waiter answered early leaves its slot to be dropped then), so the
//! table holds at most one entry per [`TICK`] of the longest wait. The ticker task starts with the
//! first deadline and ends when the last handle on the table is dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The slot width: how much earlier than asked a deadline may fire.
pub const TICK: Duration = Duration::from_millis(50);

/// The shared deadline table.
pub struct Deadlines {
    inner: Arc<Inner>,
    /// Set when the ticker task has been started (the first deadline asked).
    started: OnceLock<()>,
}

struct Inner {
    /// Slot number → the channel its deadlines wait on; dropping the sender fires them.
    slots: Mutex<BTreeMap<u64, watch::Sender<()>>>,
    /// Tells the ticker that an earlier slot was added, or that the table is gone.
    changed: Arc<Notify>,
    /// Slot 0 starts here.
    origin: Instant,
}

/// One deadline: [`Deadline::reached`] completes at (or up to one [`TICK`] before) it.
pub struct Deadline {
    rx: Option<watch::Receiver<()>>,
}

impl Deadline {
    /// Completes when the deadline is reached; at once if it already was.
    pub async fn reached(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            // Only the sender's drop (the slot firing) ends this wait.
            while rx.changed().await.is_ok() {}
        }
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            inner: Arc::new(Inner {
                slots: Mutex::default(),
                changed: Arc::new(Notify::new()),
                origin: Instant::now(),
            }),
            started: OnceLock::new(),
        }
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        // The ticker holds only a weak handle while it waits: wake it so it sees the table gone.
        self.inner.changed.notify_one();
    }
}

impl Inner {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, watch::Sender<()>>> {
        // Only single inserts and removals happen under this lock.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot `at` falls in (rounded down), or `None` when its start is not in the future.
    fn slot_of(&self, at: Instant, now: Instant) -> Option<u64> {
        let since = at.checked_duration_since(self.origin)?;
        let slot = (since.as_nanos() / TICK.as_nanos()) as u64;
        (self.start_of(slot) > now).then_some(slot)
    }

    fn start_of(&self, slot: u64) -> Instant {
        self.origin + TICK * u32::try_from(slot).unwrap_or(u32::MAX)
    }
}

impl Deadlines {
    /// A deadline at `at` (fired at most one [`TICK`] early). Within a Tokio runtime.
    pub fn at(&self, at: Instant) -> Deadline {
        let Some(slot) = self.inner.slot_of(at, Instant::now()) else {
            return Deadline { rx: None };
        };
        self.started.get_or_init(|| {
            tokio::spawn(tick(
                Arc::downgrade(&self.inner),
                Arc::clone(&self.inner.changed),
            ));
        });
        let mut table = self.inner.table();
        let earliest = table.keys().next().is_none_or(|&first| slot < first);
        let rx = table
            .entry(slot)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        drop(table);
        if earliest {
            self.inner.changed.notify_one();
        }
        Deadline { rx: Some(rx) }
    }

    /// Slots waiting to fire.
    #[cfg(test)]
    pub fn pending_slots(&self) -> usize {
        self.inner.table().len()
    }
}

/// The ticker: sleeps until the earliest slot, fires every slot due, and waits for a new
/// earliest slot when none is pending; ends when the table is dropped.
async fn tick(inner: Weak<Inner>, changed_rx: Arc<Notify>) {
    loop {
        // Registered before the table is read, so no notification is lost.
        let changed = changed_rx.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = strong.table().keys().next().map(|&s| strong.start_of(s));
        match next {
            Some(when) if when <= Instant::now() => {
                let now = Instant::now();
                let mut table = strong.table();
                let due: Vec<u64> = table
                    .keys()
                    .take_while(|&&s| strong.start_of(s) <= now)
                    .copied()
                    .collect();
                for s in due {
                    // Dropping the sender wakes every deadline of the slot.
                    table.remove(&s);
                }
                continue;
            }
            Some(when) => {
                drop(strong);
                tokio::select! {
                    _ = tokio::time::sleep_until(when) => {}
                    _ = &mut changed => {}
                }
            }
            None => {
                drop(strong);
                changed.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_within_one_tick_before_it_and_never_after() {
        let d = Deadlines::default();
        let start = Instant::now();
        let at = start + Duration::from_millis(1_030);
        let mut deadline = d.at(at);
        deadline.reached().await;
        let fired = Instant::now();
        assert!(fired <= at, "fired after its deadline");
        assert!(at - fired <= TICK, "fired more than a tick early");
        assert_eq!(d.pending_slots(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn many_deadlines_share_their_slot_and_fire_in_order() {
        let d = Arc::new(Deadlines::default());
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        // 1,000 waiters over four deadlines, two of them in one slot.
        for i in 0..1_000u64 {
            let ms = [400, 410, 200, 900][(i % 4) as usize];
            let mut deadline = d.at(start + Duration::from_millis(ms));
            tasks.spawn(async move {
                deadline.reached().await;
                (ms, Instant::now())
            });
        }
        assert_eq!(
            d.pending_slots(),
            3,
            "one slot per distinct tick, not per waiter"
        );
        while let Some(r) = tasks.join_next().await {
            let (ms, fired) = r.unwrap();
            let at = start + Duration::from_millis(ms);
            assert!(
                fired <= at && at - fired <= TICK,
                "{ms} ms fired at {:?}",
                fired - start
            );
        }
        assert_eq!(d.pending_slots(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_added_later_is_not_held_behind_a_later_one() {
        let d = Deadlines::default();
        let start = Instant::now();
        let mut late = d.at(start + Duration::from_secs(60));
        tokio::task::yield_now().await; // the ticker now sleeps until the late slot
        let mut early = d.at(start + Duration::from_millis(300));
        early.reached().await;
        assert!(Instant::now() - start <= Duration::from_millis(300));
        late.reached().await;
        assert!(Instant::now() - start >= Duration::from_secs(60) - TICK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_in_the_past_fires_at_once_and_arms_nothing() {
        let d = Deadlines::default();
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut past = d.at(Instant::now() - Duration::from_millis(10));
        past.reached().await;
        let mut now = d.at(Instant::now());
        now.reached().await;
        assert_eq!(d.pending_slots(), 0);
    }

    #[tokio::test]
    async fn the_ticker_ends_with_the_table() {
        let d = Deadlines::default();
        let _ = d.at(Instant::now() + Duration::from_secs(3600));
        let weak = Arc::downgrade(&d.inner);
        drop(d);
        // The ticker wakes on the drop, finds the table gone and returns.
        for _ in 0..100 {
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the deadline table outlived its owner");
    }
}
