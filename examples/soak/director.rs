//! How the runs change during the load: polled runs turn terminal and are replaced, recovering
//! faults get new ids, and outage windows switch the outage set to 503 and back.
//!
//! Invariant: every change made in the mock is one the target's `good` list already allows for:
//! a polled run's terminal body is in its list from the start, an outage 503 is never a 200, and
//! the outage set's running body is restored when a window closes (or the load ends).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dify_gateway::mock::Reply;

use crate::runs::{fault_target, outage_reply, PollSlot, Pools, Rng, IDS_PER_FAULT, POLL_SLOTS};
use crate::tally::Fault;

/// Recovering faults get new ids this often (a recovered run is cached for good).
const FAULT_REFRESH: Duration = Duration::from_secs(2);

/// Length of one outage window, and the time between window starts.
pub const OUTAGE_LEN: Duration = Duration::from_secs(10);
const OUTAGE_EVERY: Duration = Duration::from_secs(45);

/// When outage windows start, as offsets from the start of the load: the first at 20 s (or a
/// quarter of a short run), then every 45 s, each ending at least 3 s before the load does.
pub fn outage_plan(load: Duration) -> Vec<Duration> {
    let mut starts = Vec::new();
    let mut s = Duration::from_secs(20).min(load / 4);
    while s + OUTAGE_LEN + Duration::from_secs(3) <= load {
        starts.push(s);
        s += OUTAGE_EVERY;
    }
    starts
}

/// Turns polled runs terminal and replaces them, refreshes recovering faults, and opens and
/// closes outage windows.
pub struct Director {
    pools: Arc<Pools>,
    slots: Vec<PollSlot>,
    rng: Rng,
}

impl Director {
    /// Sets up the first poll slots and publishes them, so clients may start right after.
    pub fn new(pools: Arc<Pools>) -> Director {
        let mut rng = Rng::seeded();
        let slots: Vec<PollSlot> = (0..POLL_SLOTS)
            .map(|_| PollSlot::new(&pools.mock, &mut rng))
            .collect();
        publish_polls(&pools, &slots);
        Director { pools, slots, rng }
    }

    /// Runs until `stop`. Returns the outage windows as they happened (offsets from `t0`).
    pub async fn run(
        mut self,
        t0: Instant,
        outages: Vec<Duration>,
        stop: Arc<AtomicBool>,
    ) -> Vec<(Duration, Duration)> {
        let pools = Arc::clone(&self.pools);
        let mock = &pools.mock;
        let mut next_refresh = Instant::now() + FAULT_REFRESH;
        let mut windows = Vec::new();
        let mut open: Option<Duration> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = Instant::now();
            let mut changed = false;
            for slot in &mut self.slots {
                if !slot.switched && now >= slot.switch_at {
                    mock.set(&slot.target.id, Reply::ok_json(slot.terminal.clone()));
                    slot.switched = true;
                }
                if now >= slot.retire_at {
                    *slot = PollSlot::new(mock, &mut self.rng);
                    changed = true;
                }
            }
            if changed {
                publish_polls(&pools, &self.slots);
            }
            if now >= next_refresh {
                next_refresh = now + FAULT_REFRESH;
                let mut faults = (**pools.faults.read().unwrap_or_else(|e| e.into_inner())).clone();
                for (i, f) in Fault::ALL.iter().enumerate() {
                    if f.recovers() {
                        faults[i] = (0..IDS_PER_FAULT).map(|_| fault_target(mock, *f)).collect();
                    }
                }
                *pools.faults.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(faults);
            }
            let at = now - t0;
            match open {
                None if outages.iter().any(|s| at >= *s && at < *s + OUTAGE_LEN) => {
                    for t in &pools.outage {
                        mock.set(&t.id, outage_reply());
                    }
                    open = Some(at);
                }
                Some(began) if at >= began + OUTAGE_LEN => {
                    end_outage(&pools);
                    windows.push((began, at));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(began) = open {
            end_outage(&pools);
            windows.push((began, t0.elapsed()));
        }
        windows
    }
}

fn end_outage(pools: &Pools) {
    for t in &pools.outage {
        pools.mock.set(&t.id, Reply::ok_json(t.good[0].clone()));
    }
}

fn publish_polls(pools: &Pools, slots: &[PollSlot]) {
    let v = slots.iter().map(|s| Arc::clone(&s.target)).collect();
    *pools.polls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
}
