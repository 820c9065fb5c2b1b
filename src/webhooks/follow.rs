//! Wanted runs: each is followed to its end by one task per replica that wants it, and, with
//! the shared tier, adopted by another replica when the one following it is gone.
//!
//! Invariant: a wanted run is followed for at most as long as the wish lasts (`follow_for`:
//! `upstream.run_timeout` plus a minute, from when it was last made), by the stream the gateway
//! already reads when there is one, else through the coalesced run-detail fetch once per
//! `cache.running_ttl`. With the shared tier every followed run is a member of the follow set
//! under this replica's lease, renewed every [`RENEW`] while it follows it and handed back at
//! shutdown; a member whose lease passed is taken by any replica, which follows the run for
//! what is left of the wish. At most `webhooks.max_pending` runs are followed per replica.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Webhooks;
use crate::cache::CacheKey;
use crate::policy::EntryClass;
use crate::run_id::RunId;
use crate::shared::{follow_member, unix_ms_now, SharedTier};
use crate::upstream::App;

/// How long a replica's hold on following a run lasts without renewal.
const LEASE: Duration = Duration::from_secs(30);
/// How often a replica renews its leases.
const RENEW: Duration = Duration::from_secs(10);
/// How often a replica looks for runs nobody follows.
const ADOPT_EVERY: Duration = Duration::from_secs(1);
/// Runs adopted at most per look.
const ADOPT_BATCH: usize = 64;
/// The request id of the fetches that follow wanted runs.
static FOLLOW_REQUEST_ID: HeaderValue = HeaderValue::from_static("webhook-follower");

/// A run someone wants announced, on this replica.
pub(super) struct Wanted {
    clients: HashSet<Arc<str>>,
    /// Woken when the gateway's own reading of the run's stream ends.
    stream_ended: Arc<Notify>,
    /// Its member of the shared follow set.
    member: String,
}

/// How a follower ended.
enum Followed {
    /// The run reached a terminal status: its run-detail body.
    Ended(Bytes),
    /// Dify does not know the run (past the not-found grace): nothing will end.
    NotFound,
    /// The wish expired while the run was still running.
    Expired,
    /// The gateway is shutting down (the run is handed to another replica).
    Stopped,
}

impl Followed {
    fn as_str(&self) -> &'static str {
        match self {
            Followed::Ended(_) => "ended",
            Followed::NotFound => "not_found",
            Followed::Expired => "expired",
            Followed::Stopped => "stopped",
        }
    }
}

impl Webhooks {
    /// Records that `client` wants `run`'s end announced (in Redis too, off the caller's path)
    /// and follows the run; `streamed` when the gateway reads the run's stream now. False when
    /// `webhooks.max_pending` runs are followed already.
    pub(super) fn want(
        self: &Arc<Self>,
        app: &Arc<App>,
        run: RunId,
        client: &str,
        streamed: bool,
    ) -> bool {
        let client: Arc<str> = Arc::from(client);
        let until = Instant::now() + self.follow_for;
        if !self.follow_locally(app, run, [Arc::clone(&client)], streamed, until) {
            return false;
        }
        if let Some(shared) = self.shared.clone() {
            let (tag, ttl) = (app.tag(), self.follow_for);
            let lease = unix_ms_now() + LEASE.as_millis() as u64;
            tokio::spawn(async move {
                let _ = shared.want_webhook(&tag, run, &client, ttl, lease).await;
            });
        }
        true
    }

    /// Adds `clients` to the run's wish on this replica, starting its follower (until `until`)
    /// if none runs; false when over the bound.
    fn follow_locally(
        self: &Arc<Self>,
        app: &Arc<App>,
        run: RunId,
        clients: impl IntoIterator<Item = Arc<str>>,
        streamed: bool,
        until: Instant,
    ) -> bool {
        let key = CacheKey { app: app.id, run };
        let stream_ended = {
            let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(w) = wanted.get_mut(&key) {
                w.clients.extend(clients);
                return true;
            }
            if wanted.len() >= self.config.max_pending {
                drop(wanted);
                tracing::warn!(target: "webhooks", run = %run, "webhooks.max_pending runs are followed already; this run's end will not be announced");
                self.count_delivery("dropped");
                return false;
            }
            let stream_ended = Arc::new(Notify::new());
            wanted.insert(
                key,
                Wanted {
                    clients: clients.into_iter().collect(),
                    stream_ended: Arc::clone(&stream_ended),
                    member: follow_member(&app.tag(), run),
                },
            );
            stream_ended
        };
        self.start_background();
        let me = Arc::clone(self);
        let app = Arc::clone(app);
        tokio::spawn(async move {
            let how = me.follow(&app, run, stream_ended, streamed, until).await;
            me.followed(&app, run, how).await;
        });
        true
    }

    /// The gateway's reading of `run`'s stream ended (finished or not): its follower looks at
    /// the run now.
    pub fn stream_ended(&self, app: &App, run: RunId) {
        let key = CacheKey { app: app.id, run };
        let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = wanted.get(&key) {
            w.stream_ended.notify_one();
        }
    }

    /// Follows one wanted run until it ends, is unknown, the wish expires or shutdown.
    async fn follow(
        &self,
        app: &Arc<App>,
        run: RunId,
        stream_ended: Arc<Notify>,
        mut streamed: bool,
        until: Instant,
    ) -> Followed {
        let mut stop = self.stop.subscribe();
        loop {
            // While the gateway reads the run's stream, it says when the run ends; else the run
            // is looked at once per TTL.
            let wait = if streamed {
                until
            } else {
                (Instant::now() + self.running_ttl).min(until)
            };
            tokio::select! {
                _ = stream_ended.notified() => streamed = false,
                _ = tokio::time::sleep_until(wait) => {}
                _ = stop.wait_for(|s| *s) => return Followed::Stopped,
            }
            if Instant::now() >= until {
                return Followed::Expired;
            }
            let got = self
                .fetch
                .run(app, run, &FOLLOW_REQUEST_ID, None)
                .await
                .ok()
                .and_then(|(v, _)| v.stored());
            match got {
                Some(s) if s.class == Some(EntryClass::Terminal) => {
                    return Followed::Ended(s.body.clone())
                }
                Some(s) if s.status == StatusCode::NOT_FOUND && s.class.is_some() => {
                    return Followed::NotFound
                }
                _ => {}
            }
        }
    }

    /// A follower ended: its run is announced to everyone who wanted it here, and (unless the
    /// gateway stops) the run leaves the follow set.
    async fn followed(self: &Arc<Self>, app: &Arc<App>, run: RunId, how: Followed) {
        if let Followed::Stopped = how {
            // Kept in `wanted` and in the follow set: shutdown hands it on.
            return;
        }
        let key = CacheKey { app: app.id, run };
        let ended = self
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        if let (Some(shared), Some(w)) = (&self.shared, &ended) {
            let _ = shared.end_follow(&w.member).await;
        }
        let clients = ended.map(|w| w.clients).unwrap_or_default();
        match how {
            Followed::Ended(body) => {
                for c in clients {
                    self.announce(app, run, &c, body.clone()).await;
                }
            }
            other => {
                tracing::info!(target: "webhooks", run = %run, how = other.as_str(), "a wanted run did not end while followed; not announced");
            }
        }
    }

    /// With the shared tier: renews this replica's leases and adopts runs nobody follows, until
    /// shutdown.
    pub(super) async fn lease_loop(self: Arc<Self>, shared: SharedTier) {
        let mut stop = self.stop.subscribe();
        let mut renewed = Instant::now();
        loop {
            if renewed.elapsed() >= RENEW {
                renewed = Instant::now();
                let members = self.members();
                let until = unix_ms_now() + LEASE.as_millis() as u64;
                let _ = shared.lease_follows(&members, until).await;
            }
            self.adopt_orphans(&shared).await;
            tokio::select! {
                _ = tokio::time::sleep(ADOPT_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The follow-set members of the runs this replica follows.
    fn members(&self) -> Vec<String> {
        let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        wanted.values().map(|w| w.member.clone()).collect()
    }

    /// Takes runs whose follower is gone and follows them here.
    async fn adopt_orphans(self: &Arc<Self>, shared: &SharedTier) {
        let room = {
            let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            self.config.max_pending.saturating_sub(wanted.len())
        };
        if room == 0 {
            return;
        }
        let now = unix_ms_now();
        let lease = now + LEASE.as_millis() as u64;
        let Ok(orphans) = shared
            .take_orphan_follows(now, lease, room.min(ADOPT_BATCH))
            .await
        else {
            return;
        };
        for (tag, run) in orphans {
            let Some(app) = self.apps.iter().find(|a| a.tag() == tag) else {
                // An app this replica does not serve (or whose key was rotated since).
                let _ = shared.end_follow(&follow_member(&tag, run)).await;
                continue;
            };
            let Ok((clients, left)) = shared.webhook_wanted(&tag, run).await else {
                continue;
            };
            let clients: Vec<Arc<str>> = clients
                .into_iter()
                .filter(|c| self.has_target(c))
                .map(Arc::from)
                .collect();
            if clients.is_empty() || left.is_zero() {
                let _ = shared.end_follow(&follow_member(&tag, run)).await;
                continue;
            }
            tracing::info!(target: "webhooks", run = %run, "following a wanted run whose follower is gone");
            let until = Instant::now() + left.min(self.follow_for);
            self.follow_locally(app, run, clients, false, until);
        }
    }

    /// Shutdown: the runs followed here are handed to the replicas that go on (or the next
    /// start) at once.
    pub(super) async fn release_follows(&self) {
        let members = self.members();
        if let Some(shared) = &self.shared {
            let _ = shared.lease_follows(&members, 0).await;
        }
    }
}
