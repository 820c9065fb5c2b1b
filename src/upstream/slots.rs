//! Upstream slots: the global concurrency cap and the fair shares under it.
//!
//! Invariant: at most `upstream.max_concurrent` upstream exchanges are in flight; when several
//! apps are configured one app's fetches hold at most its share of them, and when several
//! clients are configured one client's fetches hold at most its share. An attempt takes its
//! client's share first, then its app's, then the global slot, so a flood waits (and ends in
//! `503 overloaded`) on its own share without holding a global slot that others need. A fetch
//! is charged to the client whose request started it (the flight's leader). Cache hits never
//! touch a slot. The global cap and the app shares live here; a client's share is a semaphore
//! its [`Client`](crate::clients::Client) carries, sized by [`client_share_slots`].

use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::UpstreamConfig;
use crate::metrics::RejectReason;

use super::AppId;

/// The slots `share` (a fraction in (0, 1]) of `max_concurrent` makes: rounded up, at least 1.
pub fn share_slots(max_concurrent: usize, share: f64) -> usize {
    ((max_concurrent as f64 * share).ceil() as usize).clamp(1, max_concurrent)
}

/// Each client's share when `clients` clients are configured: none with a single client (there
/// is no one to share with) or when the share is the whole cap.
pub fn client_share_slots(cfg: &UpstreamConfig, clients: usize) -> Option<usize> {
    let n = share_slots(cfg.max_concurrent, cfg.max_share_per_client);
    (clients > 1 && n < cfg.max_concurrent).then_some(n)
}

/// The global cap and the per-app shares, shared by every fetch.
#[derive(Debug)]
pub struct UpstreamSlots {
    /// Upstream exchanges in flight, over all apps.
    global: Semaphore,
    /// Each app's share, indexed by [`AppId`]; empty with a single app.
    apps: Vec<Semaphore>,
    /// How long an attempt may wait for its slots, all stages together.
    queue_timeout: Duration,
}

/// A slot held for one upstream exchange, with the shares it counts against; dropping it frees
/// all three.
#[derive(Debug)]
pub struct Slot<'a> {
    _client: Option<SemaphorePermit<'a>>,
    _app: Option<SemaphorePermit<'a>>,
    _global: SemaphorePermit<'a>,
}

impl UpstreamSlots {
    /// The slots for `apps` apps under `cfg`'s cap and shares.
    pub fn new(cfg: &UpstreamConfig, apps: usize) -> UpstreamSlots {
        let per_app = share_slots(cfg.max_concurrent, cfg.max_share_per_app);
        let apps = if apps > 1 && per_app < cfg.max_concurrent {
            (0..apps).map(|_| Semaphore::new(per_app)).collect()
        } else {
            Vec::new()
        };
        UpstreamSlots {
            global: Semaphore::new(cfg.max_concurrent),
            apps,
            queue_timeout: cfg.queue_timeout,
        }
    }

    /// Waits up to `upstream.queue_timeout` for a slot for `app`, charged to `client_share` (the
    /// slots of the client that started the fetch, see [`client_share_slots`]). On timeout, says
    /// which limit was full: the client's share, the app's, or the global cap.
    pub async fn acquire<'a>(
        &'a self,
        app: AppId,
        client_share: Option<&'a Semaphore>,
    ) -> Result<Slot<'a>, RejectReason> {
        let deadline = Instant::now() + self.queue_timeout;
        let client = match client_share {
            Some(s) => Some(wait(s, deadline, RejectReason::OverloadClient).await?),
            None => None,
        };
        let app = match self.apps.get(app.0 as usize) {
            Some(s) => Some(wait(s, deadline, RejectReason::OverloadApp).await?),
            None => None,
        };
        let global = wait(&self.global, deadline, RejectReason::Overload).await?;
        Ok(Slot {
            _client: client,
            _app: app,
            _global: global,
        })
    }
}

/// One stage of [`UpstreamSlots::acquire`]: a permit of `s` before `deadline`, or `full`.
async fn wait(
    s: &Semaphore,
    deadline: Instant,
    full: RejectReason,
) -> Result<SemaphorePermit<'_>, RejectReason> {
    // A free permit is taken without building the timer: the common case, on every fetch.
    if let Ok(p) = s.try_acquire() {
        return Ok(p);
    }
    match tokio::time::timeout_at(deadline.into(), s.acquire()).await {
        Ok(Ok(p)) => Ok(p),
        // The semaphores are never closed; a closed one is refused like a full one.
        _ => Err(full),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(max: usize, per_app: f64, per_client: f64) -> UpstreamConfig {
        let mut c = Config::for_upstream("http://127.0.0.1:9/v1", "app-k")
            .unwrap()
            .upstream;
        c.max_concurrent = max;
        c.max_share_per_app = per_app;
        c.max_share_per_client = per_client;
        // Refusals wait this long in real time; a free slot is taken at the first poll.
        c.queue_timeout = Duration::from_millis(20);
        c
    }

    #[test]
    fn shares_round_up_and_stay_within_the_cap() {
        assert_eq!(share_slots(64, 0.5), 32);
        assert_eq!(share_slots(3, 0.5), 2);
        assert_eq!(share_slots(10, 0.01), 1);
        assert_eq!(share_slots(8, 1.0), 8);
        let c = cfg(8, 0.75, 0.5);
        assert_eq!(client_share_slots(&c, 2), Some(4));
        assert_eq!(
            client_share_slots(&c, 1),
            None,
            "a lone client has no one to share with"
        );
        assert_eq!(client_share_slots(&cfg(8, 0.75, 1.0), 2), None);
        assert!(UpstreamSlots::new(&c, 1).apps.is_empty());
        assert_eq!(UpstreamSlots::new(&c, 2).apps.len(), 2);
    }

    #[tokio::test]
    async fn a_client_at_its_share_waits_while_another_gets_a_slot() {
        let c = cfg(4, 1.0, 0.5);
        let slots = UpstreamSlots::new(&c, 1);
        let (a, b) = (Semaphore::new(2), Semaphore::new(2));
        let held = [
            slots.acquire(AppId(0), Some(&a)).await.unwrap(),
            slots.acquire(AppId(0), Some(&a)).await.unwrap(),
        ];
        assert_eq!(a.available_permits(), 0);
        let refused = slots.acquire(AppId(0), Some(&a)).await.unwrap_err();
        assert_eq!(refused, RejectReason::OverloadClient);
        // B finds the global slots A could not take.
        let _b = slots.acquire(AppId(0), Some(&b)).await.unwrap();
        drop(held);
        assert_eq!(a.available_permits(), 2);
        assert!(slots.acquire(AppId(0), Some(&a)).await.is_ok());
    }

    #[tokio::test]
    async fn an_app_at_its_share_waits_and_the_global_cap_still_holds() {
        let c = cfg(4, 0.5, 1.0);
        let slots = UpstreamSlots::new(&c, 2);
        let _a = [
            slots.acquire(AppId(0), None).await.unwrap(),
            slots.acquire(AppId(0), None).await.unwrap(),
        ];
        let refused = slots.acquire(AppId(0), None).await.unwrap_err();
        assert_eq!(refused, RejectReason::OverloadApp);
        let _b = [
            slots.acquire(AppId(1), None).await.unwrap(),
            slots.acquire(AppId(1), None).await.unwrap(),
        ];
        let refused = slots.acquire(AppId(1), None).await.unwrap_err();
        assert_eq!(refused, RejectReason::OverloadApp);

        let one = cfg(2, 1.0, 1.0);
        let slots = UpstreamSlots::new(&one, 2);
        let _held = [
            slots.acquire(AppId(0), None).await.unwrap(),
            slots.acquire(AppId(1), None).await.unwrap(),
        ];
        let refused = slots.acquire(AppId(1), None).await.unwrap_err();
        assert_eq!(refused, RejectReason::Overload);
    }
}
