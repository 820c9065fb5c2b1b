//! Run starts: each client's limits on starting runs and on following them as streams, apart
//! from the rate limit every request counts against.
//!
//! Invariant: a client starts at most `runs_per_minute` runs per minute (a token bucket of that
//! size, refilled evenly) and holds at most `max_open_streams` [`StreamPermit`]s at once; a
//! permit is freed when it is dropped — when the client leaves the stream, even while the
//! gateway keeps reading the upstream to its end. A refusal takes nothing: a streaming start
//! refused by the per-minute limit gives its stream slot back. A reload keeps the state of every
//! client whose limits did not change; a changed limit starts afresh (streams opened under the
//! old one hold its slots until they end).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ClientConfig, StartLimits};
use crate::error::GatewayError;
use crate::metrics::RejectReason;

/// What a client refused for open streams is told to wait: a stream may end any moment.
pub const OPEN_STREAMS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a run start or a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StartRefused {
    /// The client's `runs_per_minute` is spent; the next start is allowed after `retry_after`.
    #[error("run starts per minute exceeded")]
    RunsPerMinute { retry_after: Duration },
    /// The client already follows `max_open_streams` streams.
    #[error("too many open streams")]
    OpenStreams,
    /// The client has used its daily quota; the next start is allowed after `retry_after`
    /// (the next UTC day).
    #[error("daily quota exceeded")]
    Quota { retry_after: Duration },
}

impl StartRefused {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        self.reason().as_str()
    }

    /// The metric label of the refusal.
    pub fn reason(self) -> RejectReason {
        match self {
            StartRefused::RunsPerMinute { .. } => RejectReason::RunsPerMinute,
            StartRefused::OpenStreams => RejectReason::OpenStreams,
            StartRefused::Quota { .. } => RejectReason::Quota,
        }
    }

    /// How long the client should wait before trying again.
    pub fn retry_after(self) -> Duration {
        match self {
            StartRefused::RunsPerMinute { retry_after } | StartRefused::Quota { retry_after } => {
                retry_after
            }
            StartRefused::OpenStreams => OPEN_STREAMS_RETRY_AFTER,
        }
    }
}

impl From<StartRefused> for GatewayError {
    fn from(r: StartRefused) -> GatewayError {
        // Whole seconds, at least one: `Retry-After: 0` would invite a busy loop.
        let retry_after_secs = r.retry_after().as_secs_f64().ceil().max(1.0) as u64;
        match r {
            StartRefused::RunsPerMinute { .. } => {
                GatewayError::TooManyRunStarts { retry_after_secs }
            }
            StartRefused::OpenStreams => GatewayError::TooManyStreams { retry_after_secs },
            StartRefused::Quota { retry_after } => GatewayError::quota_exceeded(retry_after),
        }
    }
}

/// A slot among the client's open streams, held while the client follows a stream; dropping it
/// frees the slot. Clients without `max_open_streams` get one that holds nothing.
#[derive(Debug)]
#[must_use = "the stream slot is freed as soon as the permit is dropped"]
pub struct StreamPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl StreamPermit {
    /// A permit that holds no place (a blocking run start, which follows no stream).
    pub fn none() -> StreamPermit {
        StreamPermit { _slot: None }
    }
}

/// One client's limits and their state.
struct ClientStarts {
    /// The limits this state was built for (a reload keeps the state when they are unchanged).
    limits: StartLimits,
    /// The `runs_per_minute` bucket.
    per_minute: Option<DefaultDirectRateLimiter>,
    /// `max_open_streams` slots.
    streams: Option<Arc<Semaphore>>,
}

impl ClientStarts {
    fn new(limits: StartLimits) -> ClientStarts {
        ClientStarts {
            limits,
            per_minute: limits
                .runs_per_minute
                .map(|n| RateLimiter::direct(Quota::per_minute(n))),
            streams: limits
                .max_open_streams
                .map(|n| Arc::new(Semaphore::new(n.get() as usize))),
        }
    }

    fn take_start(&self) -> Result<(), StartRefused> {
        match &self.per_minute {
            None => Ok(()),
            Some(l) => l.check().map_err(|not_until| StartRefused::RunsPerMinute {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
        }
    }

    fn take_stream(&self) -> Result<StreamPermit, StartRefused> {
        let slot = match &self.streams {
            None => None,
            Some(s) => Some(
                Arc::clone(s)
                    .try_acquire_owned()
                    .map_err(|_| StartRefused::OpenStreams)?,
            ),
        };
        Ok(StreamPermit { _slot: slot })
    }
}

/// The run-start limits of every client, by configured name.
pub struct Starts {
    by_client: ArcSwap<HashMap<String, Arc<ClientStarts>>>,
}

impl std::fmt::Debug for Starts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Starts")
            .field("clients", &self.by_client.load().len())
            .finish()
    }
}

impl Starts {
    /// The limits of `clients`.
    pub fn new(clients: &[ClientConfig]) -> Starts {
        let starts = Starts {
            by_client: ArcSwap::from_pointee(HashMap::new()),
        };
        starts.reload(clients);
        starts
    }

    /// Follows a reloaded client list: a client whose limits are unchanged keeps its bucket and
    /// its open streams; a new or changed one starts afresh; a removed one is forgotten.
    pub fn reload(&self, clients: &[ClientConfig]) {
        let old = self.by_client.load();
        let table = clients
            .iter()
            .map(|c| {
                let state = match old.get(&c.name) {
                    Some(s) if s.limits == c.starts => Arc::clone(s),
                    _ => Arc::new(ClientStarts::new(c.starts)),
                };
                (c.name.clone(), state)
            })
            .collect();
        self.by_client.store(Arc::new(table));
    }

    /// Takes one run start (a blocking or a streaming run) from `client`'s `runs_per_minute`.
    /// `None` (the gateway runs open) and unknown clients are not limited.
    pub fn start(&self, client: Option<&str>) -> Result<(), StartRefused> {
        match self.of(client) {
            Some(c) => c.take_start(),
            None => Ok(()),
        }
    }

    /// A slot among `client`'s open streams, for following a stream it did not start here (a
    /// resumed run's events).
    pub fn open_stream(&self, client: Option<&str>) -> Result<StreamPermit, StartRefused> {
        match self.of(client) {
            Some(c) => c.take_stream(),
            None => Ok(StreamPermit { _slot: None }),
        }
    }

    /// A streaming run start: a stream slot and a run start, both or neither.
    pub fn start_streaming(&self, client: Option<&str>) -> Result<StreamPermit, StartRefused> {
        let Some(c) = self.of(client) else {
            return Ok(StreamPermit { _slot: None });
        };
        // The slot first: taking it can be undone (drop), a bucket token cannot.
        let permit = c.take_stream()?;
        c.take_start()?;
        Ok(permit)
    }

    /// Streams `client` follows now, when it has `max_open_streams` (for operations and tests).
    pub fn open_streams(&self, client: &str) -> Option<usize> {
        let c = self.of(Some(client))?;
        let s = c.streams.as_ref()?;
        let max = c.limits.max_open_streams?.get() as usize;
        Some(max - s.available_permits())
    }

    fn of(&self, client: Option<&str>) -> Option<Arc<ClientStarts>> {
        self.by_client.load().get(client?).cloned()
    }
}

#[cfg(test)]
#[path = "starts_tests.rs"]
mod tests;
